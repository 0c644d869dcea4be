//! Frames out through an AF_PACKET socket bound to the interface, past its qdisc, up to a
//! batch per `sendmmsg`. Each frame is copied into a fresh skb (which a veth peer's XDP
//! copies again into a page before it runs), so it is slower than live frames, but any root
//! process may use it on any kernel, and what the receiver does to a frame never leaks into
//! the next one. The generator falls back to it where the kernel refuses live-frames test
//! runs; the bench's forwarding measurements send with it.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Frames per `sendmmsg` at most (the kernel's `UIO_MAXIOV`).
const MAX_BATCH: usize = 1024;

/// A socket that sends whole Ethernet frames out of one interface and receives nothing.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A socket on `ifindex` of this thread's network namespace.
    pub fn new(ifindex: u32) -> io::Result<Self> {
        // Protocol 0: bound to no EtherType, the socket is handed no received frame (and the
        // kernel reads each sent frame's protocol from its Ethernet header).
        // SAFETY: plain system calls on a descriptor owned from here on.
        let fd = unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain integers.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a c_int, bind with the sockaddr_ll above and its size.
        unsafe {
            // Past the qdisc, as live frames go: a full queue drops rather than holds.
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::bind(
                fd.as_raw_fd(),
                (&raw const to).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    /// Hands `frame` to the kernel `n` times, up to `batch` per system call. Every frame is
    /// handed over once: one the kernel hands back with ENOBUFS is `refused` and not sent
    /// again. A veth without a qdisc (as `ip link add` makes them) has dropped it and counts
    /// it in `tx_dropped`; a device whose queue is stopped (a NIC's full ring) counts it
    /// nowhere. Fewer than `n` are taken only when a signal interrupted a call waiting for
    /// room in the socket's send buffer.
    pub fn send(&self, frame: &[u8], n: u64, batch: usize) -> io::Result<Sent> {
        let mut iov =
            libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() };
        // SAFETY: a zeroed msghdr is valid; it points at `iov`, which outlives every call
        // below, and the kernel only reads through it.
        let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        msg.msg_hdr.msg_iov = &raw mut iov;
        msg.msg_hdr.msg_iovlen = 1;
        let per_call = batch.clamp(1, MAX_BATCH).min(usize::try_from(n).unwrap_or(MAX_BATCH));
        let mut msgs = vec![msg; per_call];
        let mut sent = Sent::default();
        while sent.taken < n {
            let k = per_call.min(usize::try_from(n - sent.taken).unwrap_or(per_call));
            // SAFETY: `msgs` holds at least `k` headers, each valid as above.
            let ret =
                unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), k as u32, 0) };
            match outcome(ret, k, io::Error::last_os_error) {
                Ok(call) => {
                    sent.taken += call.taken;
                    sent.refused += call.refused;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break,
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }
}

/// Frames the kernel took in a send, and of them those it handed back with ENOBUFS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub taken: u64,
    pub refused: u64,
}

/// What one `sendmmsg` of `k` frames that returned `ret` did. It stops at the first frame
/// that fails; when frames went before it, it returns their count and forgets the error,
/// which is taken to be ENOBUFS, the one a frame can meet alone (in a run being stopped it
/// may instead be a signal's: one frame too many is counted). An error that ends the send:
/// EINTR (nothing went), or any but ENOBUFS.
fn outcome(ret: libc::c_int, k: usize, error: impl FnOnce() -> io::Error) -> io::Result<Sent> {
    match usize::try_from(ret) {
        Ok(went) if went >= k => Ok(Sent { taken: k as u64, refused: 0 }),
        Ok(went) => Ok(Sent { taken: went as u64 + 1, refused: 1 }),
        Err(_) => match error() {
            e if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Sent { taken: 1, refused: 1 }),
            e => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_handed_back_is_refused_once_and_an_error_ends_the_send() {
        let errno = |e| move || io::Error::from_raw_os_error(e);
        let never = || -> io::Error { panic!("errno read after a success") };
        assert_eq!(outcome(64, 64, never).unwrap(), Sent { taken: 64, refused: 0 });
        // The 11th frame failed after 10 went.
        assert_eq!(outcome(10, 64, never).unwrap(), Sent { taken: 11, refused: 1 });
        assert_eq!(outcome(-1, 64, errno(libc::ENOBUFS)).unwrap(), Sent { taken: 1, refused: 1 });
        let e = outcome(-1, 64, errno(libc::EINTR)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let e = outcome(-1, 64, errno(libc::EMSGSIZE)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }
}
