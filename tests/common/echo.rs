//! TCP and UDP echo services in a namespace, for the end-to-end tests.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::Netns;

/// A TCP echo service in a namespace: every connection gets back what it sends.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addrs: Vec<SocketAddr>) -> Self {
        // Sockets belong to the namespace they are created in, whichever thread uses them.
        let listeners: Vec<TcpListener> = ns.run(move || {
            addrs
                .iter()
                .map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("listen on {a}: {e}")))
                .collect()
        });
        for l in &listeners {
            l.set_nonblocking(true).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for l in &listeners {
                    match l.accept() {
                        Ok((s, _)) => {
                            std::thread::spawn(move || echo(s));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

/// Echoes until EOF, an error, or 20 s of silence (a cut connection never sends its FIN).
fn echo(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo at `addr` in `ns`: every datagram goes back to its sender, until the test ends.
pub fn udp_echo(ns: &Netns, addr: &str) {
    let addr = addr.to_owned();
    let socket = ns.run(move || UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("{addr}: {e}")));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
}
