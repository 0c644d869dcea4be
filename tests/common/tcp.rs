//! TCP helpers with deadlines, for tests that watch a connection go on or stall.

use std::{
    io::{self, Read},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// Accepts one connection within `wait`.
pub fn accept_within(listener: &TcpListener, wait: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Reads what arrives within `wait`: `None` on timeout.
pub fn read_within(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
        Err(e) => panic!("read: {e}"),
    }
}
