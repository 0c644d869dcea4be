//! Long-lived TCP connections for failover tests. One thread drives every client socket:
//! each connection writes an 8-byte sequence number every 100 ms and waits for its echo.
//! A connection breaks on a reset, an error, an end of stream, a wrong echo, or no echo
//! within the current limit. The figures a step reads (alive, broken and why, bytes echoed,
//! longest stall) are kept as they happen. [`EchoBackend`] echoes every connection it
//! accepts from one thread, remembers who connected, and can stop as a crashed host does.

use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Netns, run_in};

/// How often each connection sends.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// One connection as the driver last saw it.
#[derive(Clone, Debug)]
pub struct ConnState {
    /// The client's end (address and source port) and the frontend it connected to.
    pub local: SocketAddr,
    pub frontend: SocketAddr,
    /// Why it broke, if it did.
    pub broken: Option<String>,
    /// Bytes echoed back so far.
    pub echoed: u64,
    /// When its last echo arrived.
    pub last_echo: Instant,
    /// Its longest wait for an echo since the last [`EchoClients::mark`] (an outstanding one
    /// counts as far as it has got).
    pub longest_stall: Duration,
    /// When its outstanding message was sent (none: it waits to send).
    sent_at: Option<Instant>,
}

impl ConnState {
    fn stall(&self, now: Instant) -> Duration {
        let pending = self.sent_at.map_or(Duration::ZERO, |t| now - t);
        self.longest_stall.max(pending)
    }
}

/// The figures of every connection at one moment.
#[derive(Clone, Debug)]
pub struct Summary {
    pub alive: usize,
    pub broken: usize,
    /// Bytes echoed since the mark.
    pub bytes: u64,
    /// The longest wait for an echo of any connection since the mark.
    pub longest_stall: Duration,
    /// Connections that waited over a second for an echo since the mark.
    pub stalled: usize,
    /// The broken connections' client ends, with why.
    pub broken_list: Vec<(SocketAddr, String)>,
}

struct Shared {
    conns: Vec<ConnState>,
    /// No echo for this long breaks a connection.
    limit: Duration,
    /// Bytes echoed by each connection at the last mark.
    marked: Vec<u64>,
}

/// Client connections driven by one thread; it stops (closing them) on drop.
pub struct EchoClients {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoClients {
    /// Opens `count` connections to each frontend of `frontends` from namespace `ns` (one
    /// after the other, each within 5 s) and starts driving them; no echo for `limit`
    /// breaks one.
    pub fn open(ns: &Netns, frontends: &[SocketAddr], count: usize, limit: Duration) -> Self {
        let targets: Vec<SocketAddr> =
            frontends.iter().flat_map(|f| std::iter::repeat_n(*f, count)).collect();
        let streams: Vec<TcpStream> = run_in(&ns.name, move || {
            targets
                .iter()
                .map(|f| {
                    let s = TcpStream::connect_timeout(f, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connect to {f}: {e}"));
                    s.set_nodelay(true).unwrap();
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect()
        });
        let now = Instant::now();
        let conns = streams
            .iter()
            .map(|s| ConnState {
                local: s.local_addr().unwrap(),
                frontend: s.peer_addr().unwrap(),
                broken: None,
                echoed: 0,
                last_echo: now,
                longest_stall: Duration::ZERO,
                sent_at: None,
            })
            .collect::<Vec<_>>();
        let marked = vec![0; conns.len()];
        let shared = Arc::new(Mutex::new(Shared { conns, limit, marked }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, flag) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || drive(streams, &s, &flag));
        Self { shared, stop, thread: Some(thread) }
    }

    /// From now on, no echo for `limit` breaks a connection.
    pub fn set_limit(&self, limit: Duration) {
        self.shared.lock().unwrap().limit = limit;
    }

    /// Starts a step: its bytes and longest stall count from here.
    pub fn mark(&self) {
        let mut sh = self.shared.lock().unwrap();
        sh.marked = sh.conns.iter().map(|c| c.echoed).collect();
        for c in &mut sh.conns {
            c.longest_stall = Duration::ZERO;
        }
    }

    /// Every connection as it is now.
    pub fn states(&self) -> Vec<ConnState> {
        self.shared.lock().unwrap().conns.clone()
    }

    pub fn summary(&self) -> Summary {
        let now = Instant::now();
        let sh = self.shared.lock().unwrap();
        let broken_list: Vec<_> =
            sh.conns.iter().filter_map(|c| Some((c.local, c.broken.clone()?))).collect();
        Summary {
            alive: sh.conns.len() - broken_list.len(),
            broken: broken_list.len(),
            bytes: sh.conns.iter().zip(&sh.marked).map(|(c, m)| c.echoed - m).sum(),
            longest_stall: sh.conns.iter().map(|c| c.stall(now)).max().unwrap_or_default(),
            stalled: sh.conns.iter().filter(|c| c.stall(now) > Duration::from_secs(1)).count(),
            broken_list,
        }
    }

    /// Polls until every connection still alive has had an echo after `since` (within
    /// `within`); returns how long after `since` the last of them arrived. Panics naming
    /// the connections still waiting.
    pub fn wait_echoing(&self, since: Instant, within: Duration) -> Duration {
        let deadline = Instant::now() + within;
        loop {
            let states = self.states();
            let waiting: Vec<_> = states
                .iter()
                .filter(|c| c.broken.is_none() && c.last_echo <= since)
                .map(|c| c.local)
                .collect();
            if waiting.is_empty() {
                let last = states.iter().filter(|c| c.broken.is_none()).map(|c| c.last_echo);
                return last.max().map_or(Duration::ZERO, |t| t.saturating_duration_since(since));
            }
            assert!(
                Instant::now() < deadline,
                "{} connections without an echo for {within:?}: {waiting:?}",
                waiting.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EchoClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection's socket and its partial echo.
struct Live {
    stream: Option<TcpStream>,
    seq: u64,
    buf: [u8; 8],
    got: usize,
    next_send: Instant,
}

/// The driver: sends each due message, reads echoes, breaks what fails.
fn drive(streams: Vec<TcpStream>, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let start = Instant::now();
    let mut live: Vec<Live> = streams
        .into_iter()
        .enumerate()
        .map(|(i, s)| Live {
            stream: Some(s),
            seq: 0,
            buf: [0; 8],
            got: 0,
            // Spread over the interval, so the sends do not come in one burst.
            next_send: start + INTERVAL * (i as u32) / 64,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = live
            .iter()
            .filter_map(|l| l.stream.as_ref())
            .map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        let now = Instant::now();
        let mut sh = shared.lock().unwrap();
        let limit = sh.limit;
        for (l, c) in live.iter_mut().zip(sh.conns.iter_mut()) {
            if l.stream.is_none() {
                continue;
            }
            if let Err(why) = step(l, c, now, limit) {
                c.broken = Some(why);
                c.sent_at = None;
                l.stream = None;
            }
        }
    }
}

/// One connection's turn: read what arrived, send when due.
fn step(l: &mut Live, c: &mut ConnState, now: Instant, limit: Duration) -> Result<(), String> {
    let s = l.stream.as_mut().expect("live");
    loop {
        match s.read(&mut l.buf[l.got..]) {
            Ok(0) => return Err("closed by the peer".into()),
            Ok(n) => {
                l.got += n;
                if l.got < 8 {
                    continue;
                }
                l.got = 0;
                let echoed = u64::from_be_bytes(l.buf);
                if c.sent_at.is_none() || echoed != l.seq {
                    return Err(format!("echo {echoed}, expected {}", l.seq));
                }
                let sent = c.sent_at.take().expect("sent");
                c.longest_stall = c.longest_stall.max(now - sent);
                c.last_echo = now;
                c.echoed += 8;
                l.seq += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    match c.sent_at {
        Some(sent) if now - sent > limit => {
            Err(format!("no echo for {:.1} s", (now - sent).as_secs_f64()))
        }
        Some(_) => Ok(()),
        None if now >= l.next_send => {
            // 8 bytes into an empty send buffer: written whole or not at all.
            s.write_all(&l.seq.to_be_bytes()).map_err(|e| e.to_string())?;
            c.sent_at = Some(now);
            l.next_send = now + INTERVAL;
            Ok(())
        }
        None => Ok(()),
    }
}

/// An echo service in a backend namespace: every connection to `port` (both families)
/// gets back what it sends, and `probe_port` accepts connections (a health probe's TCP
/// connect) and closes them. One thread; stopped on drop.
pub struct EchoBackend {
    stop: Arc<AtomicBool>,
    /// With SO_LINGER 0 on every connection when stopped: each ends with a reset.
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The client ends of the connections it accepted on `port`.
    accepted: Arc<Mutex<BTreeSet<SocketAddr>>>,
}

impl EchoBackend {
    pub fn start(ns: &Netns, port: u16, probe_port: u16) -> Self {
        // [::] takes both families (bindv6only is 0 in a fresh namespace).
        let listeners: Vec<TcpListener> = run_in(&ns.name, move || {
            [port, probe_port]
                .map(|p| {
                    let l =
                        TcpListener::bind(("::", p)).unwrap_or_else(|e| panic!("listen {p}: {e}"));
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .into()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let abort = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(BTreeSet::new()));
        let (flag, abort_flag, seen) = (stop.clone(), abort.clone(), accepted.clone());
        let thread = std::thread::spawn(move || serve(&listeners, &flag, &abort_flag, &seen));
        Self { stop, abort, thread: Some(thread), accepted }
    }

    /// The client ends of the connections it accepted (IPv4 ones as IPv4, not mapped).
    pub fn accepted(&self) -> BTreeSet<SocketAddr> {
        self.accepted.lock().unwrap().clone()
    }

    /// Stops as a crashed host's service does: every connection reset, the probe port
    /// closed.
    pub fn crash(mut self) {
        self.abort.store(true, Ordering::Relaxed);
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn serve(
    listeners: &[TcpListener],
    stop: &AtomicBool,
    abort: &AtomicBool,
    accepted: &Mutex<BTreeSet<SocketAddr>>,
) {
    let [service, probe] = listeners else { unreachable!() };
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(conns.iter().map(AsRawFd::as_raw_fd))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10) };
        while let Ok((s, from)) = service.accept() {
            s.set_nonblocking(true).unwrap();
            s.set_nodelay(true).unwrap();
            accepted.lock().unwrap().insert(canonical(from));
            conns.push(s);
        }
        while probe.accept().is_ok() {}
        conns.retain_mut(|s| {
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return false,
                    // A few bytes into a socket whose peer reads them at once: room enough.
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
    }
    if abort.load(Ordering::Relaxed) {
        for s in &conns {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt with a linger struct of its size on our own socket.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
    }
}
