//! One rtnetlink request and its answer, and the attributes of a message: what `fib`
//! (neighbour table) and `host_routes` (the agent's BGP table) send and read.

use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;

/// An `nlmsghdr` of type `kind` whose length [`request`] fills in; the body follows.
pub fn header(kind: u16, flags: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(64);
    h.extend_from_slice(&0u32.to_ne_bytes());
    h.extend_from_slice(&kind.to_ne_bytes());
    h.extend_from_slice(&flags.to_ne_bytes());
    h.extend_from_slice(&1u32.to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    h
}

/// Appends attribute `kind` with `value`, padded to 4 bytes.
pub fn attr(req: &mut Vec<u8>, kind: u16, value: &[u8]) {
    req.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(value);
    req.resize(req.len().next_multiple_of(4), 0);
}

/// Sends `req` (from [`header`]) on a socket of its own, in the current network namespace,
/// and reads the answer to its end (a dump's `NLMSG_DONE` or the acknowledgement), handing
/// each other message's type and body to `each`. `what` names the request in errors; an
/// error the kernel reports (at the start of a dump or at its end) is one.
pub fn request(req: Vec<u8>, what: &str, each: impl FnMut(u16, &[u8])) -> Result<()> {
    exchange(req, what, false, each)
}

/// As [`request`], for a dump the kernel filters by what `req` asks (its header's fields and
/// attributes, e.g. a route table) rather than sending everything: strict checking
/// (`NETLINK_GET_STRICT_CHK`, Linux 4.20). A kernel without it sends everything; the caller
/// filters what it reads either way.
pub fn dump_filtered(req: Vec<u8>, what: &str, each: impl FnMut(u16, &[u8])) -> Result<()> {
    exchange(req, what, true, each)
}

fn exchange(
    mut req: Vec<u8>,
    what: &str,
    strict: bool,
    mut each: impl FnMut(u16, &[u8]),
) -> Result<()> {
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .context("opening a netlink socket")?;
    if strict {
        let on: libc::c_int = 1;
        // SAFETY: an int option of the size given, on a socket we own. A failure (an older
        // kernel) leaves the dump unfiltered, which the caller's own filter handles.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_GET_STRICT_CHK,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding a netlink socket")?;
    send(fd.as_raw_fd(), &req, MsgFlags::empty()).with_context(|| what.to_owned())?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n =
            recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).with_context(|| what.to_owned())?;
        let mut msgs = &buf[..n];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes(msgs[0..4].try_into()?) as usize;
            let kind = u16::from_ne_bytes(msgs[4..6].try_into()?);
            if len < 16 || len > msgs.len() {
                bail!("{what}: a malformed netlink message");
            }
            match kind {
                // An acknowledgement is an error message with errno 0; a dump's end carries
                // the dump's errno (0 when it succeeded).
                NLMSG_DONE | NLMSG_ERROR => {
                    let errno = msgs
                        .get(16..20)
                        .map_or(0, |e| i32::from_ne_bytes(e.try_into().expect("four bytes")));
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(std::io::Error::from_raw_os_error(-errno))
                        .with_context(|| what.to_owned());
                }
                _ => each(kind, &msgs[16..len]),
            }
            msgs = &msgs[len.next_multiple_of(4).min(msgs.len())..];
        }
    }
}

/// The attributes (type, value) of a message body whose fixed header is `fixed` bytes.
pub fn attributes(body: &[u8], fixed: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut attrs = body.get(fixed..).unwrap_or_default();
    std::iter::from_fn(move || {
        if attrs.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        let value = &attrs[4..len];
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
        Some((kind, value))
    })
}
