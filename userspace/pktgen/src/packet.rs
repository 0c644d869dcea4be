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

    /// Hands `frame` to the kernel `n` times, up to `batch` per system call, and returns
    /// how many it took: each frame either left or was dropped by the device (and counted
    /// in its `tx_dropped`), as live frames are. Fewer than `n` only when a signal
    /// interrupted a call that was waiting for room in the socket's send buffer.
    pub fn send(&self, frame: &[u8], n: u64, batch: usize) -> io::Result<u64> {
        let mut iov =
            libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() };
        // SAFETY: a zeroed msghdr is valid; it points at `iov`, which outlives every call
        // below, and the kernel only reads through it.
        let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        msg.msg_hdr.msg_iov = &raw mut iov;
        msg.msg_hdr.msg_iovlen = 1;
        let per_call = batch.clamp(1, MAX_BATCH).min(usize::try_from(n).unwrap_or(MAX_BATCH));
        let mut msgs = vec![msg; per_call];
        let mut taken = 0;
        while taken < n {
            let k = per_call.min(usize::try_from(n - taken).unwrap_or(per_call));
            // SAFETY: `msgs` holds at least `k` headers, each valid as above.
            let sent =
                unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), k as u32, 0) };
            // A device that drops a frame (its peer's ring full, no carrier) fails its send
            // with ENOBUFS. `sendmmsg` stops at the first failure and, when frames went before
            // it, returns their count and forgets the error. Either way the failed frame was
            // taken and dropped: it is not sent again. (In a run being stopped, the forgotten
            // error may instead be a signal's: one frame too many is counted.)
            if sent < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => taken += 1,
                    Some(libc::EINTR) => return Ok(taken),
                    _ => return Err(e),
                }
            } else {
                taken += (sent as u64 + 1).min(k as u64);
            }
        }
        Ok(taken)
    }
}
