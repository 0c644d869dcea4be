//! Issue 12, end to end: a flood of spoofed SYNs (1,000,000 per address family, IPv4 and
//! IPv6, each from its own source address and port, as fast as `xdpgate-pktgen` sends them)
//! against an allowed port of a protected server, while the gateway carries established
//! connections of every kind: plain NSG (internet client -> protected server), load-balanced
//! (internet client -> frontend -> backend) and SNAT-ed (protected client -> NAT gateway ->
//! internet server), IPv4 and IPv6. Some are idle during the flood, some stream both ways.
//! The agent (`xdpgate run`) runs, as users run it.
//!
//! After the flood every idle connection must carry data both ways without one
//! retransmission (none of its segments was dropped), every busy one must have echoed every
//! byte it sent, unchanged, and the counters must account for every SYN the generator sent.
//!
//!   inet 203.0.113.10 2001:db8:2::10 -- ext0 [gw] int0 -- prot 198.51.100.10  NSG echo :9000
//!                                                                198.51.100.20  LB backend :8080
//!                                                                198.51.100.130 SNAT client
//!   flooder (no address)              -- ext1 [gw]               (and 2001:db8:1::10, ::20,
//!                                                                 2001:db8:1:0:8000::130)
//!   frontends 192.0.2.50:80, [2001:db8:f::50]:80; NAT public 192.0.2.100, 2001:db8:e::100
//!   spoofed sources 192.0.2.128/25 and 2001:db8:ff::/64 (the gateway routes them, like
//!   everything else outside, to inet, which drops what is not its own)
//!
//! The flood comes in on an interface of its own so that the generator's TX counters and
//! xdpgate's counters on that interface count the flood and nothing else.
//! `XDPGATE_LONG=1`: 2,000,000 SYNs per family and more connections.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::{Netns, Pins, long, pktgen_bin, retransmissions, run, unique};
use serde_json::Value;

const ECHO_PORT: u16 = 9000;
const BACKEND_PORT: u16 = 8080;
const FRONTEND_PORT: u16 = 80;
const INET_PORT: u16 = 9100;
const VIP4: &str = "192.0.2.50";
const VIP6: &str = "2001:db8:f::50";
const PUBLIC4: &str = "192.0.2.100";
const PUBLIC6: &str = "2001:db8:e::100";
/// How long an idle connection has, after the flood, to carry its message each way: TCP's
/// first retransmissions (200 ms, doubling) fit several times over.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

fn policy() -> String {
    format!(
        r#"
virtual_network:
  address_space: [198.51.100.0/24, "2001:db8:1::/64"]
nsgs:
  - name: prot
    subnets: [198.51.100.0/24, "2001:db8:1::/64"]
    rules:
      - {{name: allow-echo, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: [198.51.100.10, "2001:db8:1::10"],
         destination_ports: {ECHO_PORT}}}
      - {{name: allow-backend, priority: 110, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: [198.51.100.20, "2001:db8:1::20"],
         destination_ports: {BACKEND_PORT}}}
load_balancers:
  - name: lb
    frontends:
      - {{name: vip4, address: {VIP4}}}
      - {{name: vip6, address: "{VIP6}"}}
    backend_pools:
      - {{name: pool4, backends: [198.51.100.20]}}
      - {{name: pool6, backends: ["2001:db8:1::20"]}}
    rules:
      - {{name: echo4, frontend: vip4, protocol: tcp, frontend_port: {FRONTEND_PORT},
         backend_port: {BACKEND_PORT}, backend_pool: pool4}}
      - {{name: echo6, frontend: vip6, protocol: tcp, frontend_port: {FRONTEND_PORT},
         backend_port: {BACKEND_PORT}, backend_pool: pool6}}
nat_gateways:
  - name: natgw
    public_addresses: [{PUBLIC4}, "{PUBLIC6}"]
    subnets: [198.51.100.128/25, "2001:db8:1:0:8000::/65"]
"#
    )
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn link(a: &Netns, an: &str, b: &Netns, bn: &str) {
    run(
        "ip",
        &[
            "link", "add", an, "netns", &a.name, "type", "veth", "peer", "name", bn, "netns",
            &b.name,
        ],
    );
}

fn mac(ns: &Netns, ifname: &str) -> String {
    let out = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Lab {
    // Field order is drop order: the agent, then the attachments (they need the gateway
    // namespace), then the namespaces.
    agent: Option<Child>,
    pins: Pins,
    inet: Netns,
    gw: Netns,
    prot: Netns,
    flooder: Netns,
    dir: PathBuf,
}

impl Lab {
    fn new() -> Self {
        let inet = Netns::new("fli");
        let gw = Netns::new("flg");
        let prot = Netns::new("flp");
        let flooder = Netns::new("flf");
        link(&inet, "eth0", &gw, "ext0");
        link(&gw, "int0", &prot, "eth0");
        // The flooder's interface must send nothing but the generator's frames: no address,
        // no IPv6 (no router solicitations or DAD), set before it comes up.
        link(&flooder, "fl0", &gw, "ext1");
        flooder.exec("sysctl", &["-qw", "net.ipv6.conf.fl0.disable_ipv6=1"]);
        for (ns, dev, addrs) in [
            (&inet, "eth0", &["203.0.113.10/24", "2001:db8:2::10/64"][..]),
            (&gw, "ext0", &["203.0.113.1/24", "2001:db8:2::1/64"]),
            (&gw, "int0", &["198.51.100.1/24", "2001:db8:1::1/64"]),
            (
                &prot,
                "eth0",
                &[
                    "198.51.100.10/24",
                    "198.51.100.20/24",
                    "198.51.100.130/24",
                    "2001:db8:1::10/64",
                    "2001:db8:1::20/64",
                    "2001:db8:1:0:8000::130/64",
                ],
            ),
        ] {
            for a in addrs {
                let mut args = vec!["addr", "add", a, "dev", dev];
                if a.contains(':') {
                    args.push("nodad");
                }
                ns.exec("ip", &args);
            }
        }
        for (ns, dev) in [
            (&inet, "eth0"),
            (&gw, "ext0"),
            (&gw, "int0"),
            (&gw, "ext1"),
            (&prot, "eth0"),
            (&flooder, "fl0"),
        ] {
            ns.exec("ip", &["link", "set", dev, "up"]);
        }
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        // The flood arrives on ext1 from sources routed out of ext0: no reverse-path filter.
        for conf in ["all", "default", "ext1"] {
            gw.exec("sysctl", &["-qw", &format!("net.ipv4.conf.{conf}.rp_filter=0")]);
        }
        // The internet is the gateway's default route, so the frontends are routed (not
        // local) there, as on a real gateway. inet does not forward: the flood's SYN-ACKs
        // to spoofed sources end there.
        gw.exec("ip", &["route", "add", "default", "via", "203.0.113.10"]);
        gw.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:2::10"]);
        inet.exec("ip", &["route", "add", "default", "via", "203.0.113.1"]);
        inet.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        prot.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
        prot.exec("ip", &["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        // Connections the protected subnet opens to the internet leave from the NAT
        // gateway's subnet; the servers' answers keep their own addresses.
        prot.exec(
            "ip",
            &["route", "add", "203.0.113.0/24", "via", "198.51.100.1", "src", "198.51.100.130"],
        );
        prot.exec(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                "2001:db8:1::1",
                "src",
                "2001:db8:1:0:8000::130",
            ],
        );
        // Every SYN costs the server one SYN-ACK and no state (a server under a flood uses
        // cookies anyway): so no SYN-ACK is ever retransmitted, which bounds the flood's
        // flow-less packets (see `check_counters`).
        prot.exec("sysctl", &["-qw", "net.ipv4.tcp_syncookies=2"]);
        // Frames XDP redirects into a veth need NAPI (GRO) on the receiving peer, and
        // senders must compute full checksums (see tests/common/lan.rs).
        for ns in [&inet, &prot] {
            ns.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", "off"]);
        }
        // IPv6 neighbour discovery needs the link-local addresses, which start tentative
        // (duplicate address detection); then every neighbour entry the connections need is
        // resolved once, so that no connection's first packets wait on it.
        for ns in [&inet, &gw, &prot] {
            let start = Instant::now();
            while !String::from_utf8_lossy(
                &ns.exec("ip", &["-6", "addr", "show", "tentative"]).stdout,
            )
            .trim()
            .is_empty()
            {
                assert!(start.elapsed() < Duration::from_secs(10), "IPv6 addresses stay tentative");
                thread::sleep(Duration::from_millis(50));
            }
        }
        for (ns, to) in [
            (&inet, "203.0.113.1"),
            (&inet, "2001:db8:2::1"),
            (&prot, "198.51.100.1"),
            (&prot, "2001:db8:1::1"),
            (&gw, "198.51.100.10"),
            (&gw, "198.51.100.20"),
            (&gw, "198.51.100.130"),
            (&gw, "2001:db8:1::10"),
            (&gw, "2001:db8:1::20"),
            (&gw, "2001:db8:1:0:8000::130"),
        ] {
            ns.exec("ping", &["-c", "1", "-W", "2", to]);
        }
        let pins = Pins::in_netns(&gw);
        for (iface, role) in [("ext0", "external"), ("int0", "internal"), ("ext1", "external")] {
            pins.xdpgate(&["attach", "--hook", "xdp", "--iface", iface, "--role", role]);
        }
        let dir = std::env::temp_dir().join(unique("flood"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("policy.yaml");
        std::fs::write(&file, policy()).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let agent = pins.agent(&file).stderr(log).spawn().expect("spawn xdpgate run");
        let lab = Self { agent: Some(agent), pins, inet, gw, prot, flooder, dir };
        let start = Instant::now();
        while lab.stats()["policy"].is_null() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the agent applied no policy in 10 s; its log:\n{}",
                lab.agent_log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        lab
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn stats(&self) -> Value {
        json(&self.pins.xdpgate(&["stats", "--json"]))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Nsg,
    Lb,
    Snat,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nsg => "plain NSG",
            Kind::Lb => "load-balanced",
            Kind::Snat => "SNAT-ed",
        }
    }
}

/// One connection, both ends held by the test.
struct Conn {
    name: String,
    kind: Kind,
    v6: bool,
    client: TcpStream,
    server: TcpStream,
}

impl Conn {
    fn label(&self) -> String {
        format!(
            "{} ({} -> {})",
            self.name,
            self.client.local_addr().map_or("?".into(), |a| a.to_string()),
            self.client.peer_addr().map_or("?".into(), |a| a.to_string())
        )
    }
}

/// Byte `i` of a stream: not periodic over any short span, so a lost, repeated or
/// misplaced segment shows.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8 ^ (i / 251) as u8
}

/// Reads exactly `buf.len()` bytes or says how far it got.
fn read_full(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(format!("connection closed after {got} of {} bytes", buf.len())),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("{got} of {} bytes within {EXCHANGE_TIMEOUT:?}", buf.len()));
            }
            Err(e) => return Err(format!("{e} after {got} of {} bytes", buf.len())),
        }
    }
    Ok(())
}

/// A message each way: client to server, then server to client.
fn exchange(c: &mut TcpStream, s: &mut TcpStream, tag: u8) -> Result<(), String> {
    let out: Vec<u8> = (0..1000u64).map(|i| pattern(i) ^ tag).collect();
    c.write_all(&out).map_err(|e| format!("client write: {e}"))?;
    let mut buf = vec![0u8; out.len()];
    read_full(s, &mut buf).map_err(|e| format!("client -> server: {e}"))?;
    if buf != out {
        return Err("client -> server: the bytes arrived changed".into());
    }
    let back: Vec<u8> = out.iter().map(|b| !b).collect();
    s.write_all(&back).map_err(|e| format!("server write: {e}"))?;
    read_full(c, &mut buf).map_err(|e| format!("server -> client: {e}"))?;
    if buf != back {
        return Err("server -> client: the bytes arrived changed".into());
    }
    Ok(())
}

fn accept(l: &TcpListener) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match l.accept() {
            Ok((s, _)) => return s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection arrived at {:?}", l.local_addr());
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Listeners of the three services, each created in its namespace.
struct Services {
    echo: [TcpListener; 2],
    backend: [TcpListener; 2],
    inet: [TcpListener; 2],
    /// Connection attempts (before the flood) that timed out and were made again.
    retried: std::cell::RefCell<Vec<String>>,
}

impl Services {
    fn new(lab: &Lab) -> Self {
        let listen = |ns: &Netns, addrs: [&str; 2], port: u16| -> [TcpListener; 2] {
            let addrs: Vec<SocketAddr> =
                addrs.iter().map(|a| SocketAddr::new(a.parse().unwrap(), port)).collect();
            let ls: Vec<TcpListener> = ns
                .run(move || addrs.iter().map(|a| TcpListener::bind(a).expect("listen")).collect());
            for l in &ls {
                l.set_nonblocking(true).unwrap();
            }
            ls.try_into().unwrap()
        };
        Self {
            echo: listen(&lab.prot, ["198.51.100.10", "2001:db8:1::10"], ECHO_PORT),
            backend: listen(&lab.prot, ["198.51.100.20", "2001:db8:1::20"], BACKEND_PORT),
            inet: listen(&lab.inet, ["203.0.113.10", "2001:db8:2::10"], INET_PORT),
            retried: Default::default(),
        }
    }

    /// Opens a connection of `kind`, checks where it arrived and that a message crosses
    /// each way.
    fn open(&self, lab: &Lab, kind: Kind, v6: bool, name: String) -> Conn {
        let f = usize::from(v6);
        let (ns, to, listener): (&Netns, SocketAddr, &TcpListener) = match kind {
            Kind::Nsg => (
                &lab.inet,
                SocketAddr::new(
                    if v6 { "2001:db8:1::10" } else { "198.51.100.10" }.parse().unwrap(),
                    ECHO_PORT,
                ),
                &self.echo[f],
            ),
            Kind::Lb => (
                &lab.inet,
                SocketAddr::new(if v6 { VIP6 } else { VIP4 }.parse().unwrap(), FRONTEND_PORT),
                &self.backend[f],
            ),
            Kind::Snat => (
                &lab.prot,
                SocketAddr::new(
                    if v6 { "2001:db8:2::10" } else { "203.0.113.10" }.parse().unwrap(),
                    INET_PORT,
                ),
                &self.inet[f],
            ),
        };
        let connect = || ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)));
        // Seen before the flood, with the old code and the new: now and then the SYNs of a
        // first connection to a frontend leave the gateway unbalanced (XDP passes them, the
        // kernel routes them back to the internet), while the same client's next connection,
        // from another port, is balanced. Not what this test is about: the attempt is made
        // again, and reported.
        let mut client = connect()
            .or_else(|e| {
                self.retried.borrow_mut().push(format!("{name} ({to}): {e}"));
                connect()
            })
            .unwrap_or_else(|e| {
                let stats = lab.stats();
                panic!(
                    "{name}: connect to {to}, twice: {e}; drops {}, interfaces {}, flows:\n{}\nlb:\n{}\nagent log:\n{}",
                    stats["drops"],
                    stats["interfaces"],
                    lab.pins.xdpgate(&["flows"]),
                    lab.pins.xdpgate(&["lb"]),
                    lab.agent_log()
                )
            });
        let mut server = accept(listener);
        server.set_nonblocking(false).unwrap();
        let seen = server.peer_addr().unwrap().ip();
        match kind {
            // The backend sees the client's own address (DNAT only).
            Kind::Nsg | Kind::Lb => assert_eq!(seen, client.local_addr().unwrap().ip(), "{name}"),
            Kind::Snat => {
                let public: IpAddr = if v6 { PUBLIC6 } else { PUBLIC4 }.parse().unwrap();
                assert_eq!(seen, public, "{name}: the internet server saw the public address");
            }
        }
        for s in [&client, &server] {
            s.set_read_timeout(Some(EXCHANGE_TIMEOUT)).unwrap();
            s.set_nodelay(true).unwrap();
        }
        exchange(&mut client, &mut server, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        Conn { name, kind, v6, client, server }
    }
}

/// A connection streaming both ways: the client writes a known stream, the server echoes
/// it, the client checks every byte that comes back.
struct Stream {
    label: String,
    stop: Arc<AtomicBool>,
    /// Bytes the client has received back (and checked) so far.
    echoed: Arc<AtomicU64>,
    writer: JoinHandle<Result<u64, String>>,
    reader: JoinHandle<Result<u64, String>>,
    echo: JoinHandle<Result<u64, String>>,
}

/// Bytes per write, and the pause after each: about 400 kB/s each way per connection, so
/// that the streams do not take the CPU time the flood needs.
const CHUNK: usize = 4096;
const PAUSE: Duration = Duration::from_millis(10);
/// A busy connection that moves nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(30);

impl Stream {
    fn start(conn: Conn) -> Self {
        let label = conn.label();
        let Conn { client, server, .. } = conn;
        for s in [&client, &server] {
            s.set_read_timeout(Some(STALL)).unwrap();
            // A cut connection must not leave a writer blocked on a full send buffer.
            s.set_write_timeout(Some(STALL)).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let mut server_in = server;
        let echo = thread::spawn(move || {
            let mut out = server_in.try_clone().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match server_in.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        out.write_all(&buf[..n])
                            .map_err(|e| format!("server write after {total} bytes echoed: {e}"))?;
                        total += n as u64;
                    }
                    Err(e) => return Err(format!("server read after {total} bytes: {e}")),
                }
            }
            let _ = out.shutdown(Shutdown::Write);
            Ok(total)
        });
        let mut client_out = client.try_clone().unwrap();
        let flag = stop.clone();
        let writer = thread::spawn(move || {
            let mut sent = 0u64;
            let mut chunk = vec![0u8; CHUNK];
            while !flag.load(Ordering::Relaxed) {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                client_out
                    .write_all(&chunk)
                    .map_err(|e| format!("client write after {sent} bytes: {e}"))?;
                sent += CHUNK as u64;
                thread::sleep(PAUSE);
            }
            client_out.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            Ok(sent)
        });
        let mut client_in = client;
        let count = echoed.clone();
        let reader = thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            loop {
                match client_in.read(&mut buf) {
                    Ok(0) => return Ok(got),
                    Ok(n) => {
                        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(got + i as u64)) {
                            return Err(format!("byte {} came back changed", got + i as u64));
                        }
                        got += n as u64;
                        count.store(got, Ordering::Relaxed);
                    }
                    Err(e) => return Err(format!("client read after {got} bytes back: {e}")),
                }
            }
        });
        Self { label, stop, echoed, writer, reader, echo }
    }

    /// Stops writing and waits for the rest to come back: the bytes streamed, if every one
    /// came back unchanged.
    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Relaxed);
        let join = |h: JoinHandle<Result<u64, String>>| {
            h.join().unwrap_or_else(|_| Err("a stream thread panicked".into()))
        };
        let sent = join(self.writer)?;
        let echoed = join(self.echo)?;
        let back = join(self.reader)?;
        if sent != echoed || echoed != back {
            return Err(format!("sent {sent} bytes, the server echoed {echoed}, {back} came back"));
        }
        Ok(back)
    }
}

/// One pktgen flood: `count` SYNs, each from its own spoofed source address and port.
fn flood(lab: &Lab, v6: bool, count: u64) -> Value {
    let dst_mac = mac(&lab.gw, "ext1");
    // IPv4: 128 sources x 15,625 ports; IPv6: 65,535 sources x 32 ports.
    let (src, sport, dst) = if v6 {
        ("2001:db8:ff::1-2001:db8:ff::ffff", "10000-10031", "2001:db8:1::10")
    } else {
        ("192.0.2.128-192.0.2.255", "10000-25624", "198.51.100.10")
    };
    let out = Command::new(pktgen_bin())
        .args(["--netns", &lab.flooder.name, "--iface", "fl0", "--proto", "tcp", "--json"])
        .args(["--dst-mac", &dst_mac, "--src", src, "--sport", sport, "--dst", dst])
        .args(["--dport", &ECHO_PORT.to_string()])
        .args(["--count", &count.to_string(), "--flows", &count.to_string()])
        // One frame per send, one sender: every SYN a distinct template, none repeated
        // (senders share one budget, so a faster second sender would wrap around its
        // templates and repeat them).
        .args(["--burst", "1", "--threads", "1"])
        .output()
        .expect("spawn xdpgate-pktgen");
    assert!(
        out.status.success(),
        "xdpgate-pktgen failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["flows"], count, "every SYN distinct: {report}");
    assert_eq!(report["submitted"], count, "{report}");
    let (sent, dropped) =
        (report["tx_packets"].as_u64().unwrap(), report["tx_dropped"].as_u64().unwrap());
    // Nothing else leaves fl0, so its counters are the flood's exactly.
    assert_eq!(sent + dropped, count, "fl0's TX counters: {report}");
    report
}

fn drops(stats: &Value) -> Vec<(String, u64)> {
    stats["drops"]
        .as_object()
        .expect("drops in stats")
        .iter()
        .map(|(reason, d)| (reason.clone(), d["packets"].as_u64().unwrap()))
        .collect()
}

fn drop_count(stats: &Value, reason: &str) -> u64 {
    drops(stats).iter().find(|(r, _)| r == reason).map_or(0, |(_, n)| *n)
}

fn rule_flows(stats: &Value, rule: &str) -> u64 {
    stats["policy"]["rules"]
        .as_array()
        .expect("rule hits in stats")
        .iter()
        .filter(|r| r["rule"] == rule)
        .map(|r| r["flows"].as_u64().unwrap())
        .sum()
}

/// Packets xdpgate counted on `iface`, all verdicts.
fn iface_packets(stats: &Value, iface: &str) -> u64 {
    stats["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["interface"] == iface)
        .unwrap_or_else(|| panic!("{iface} missing from stats: {stats}"))["verdicts"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["packets"].as_u64().unwrap())
        .sum()
}

/// The embryonic counters of `stats --json`'s `flow_table` section, by name.
const EMBRYONIC: [&str; 7] =
    ["live", "created", "confirmed", "expired", "refused", "closed", "evicted"];

fn embryonic(stats: &Value, field: &str) -> Result<u64, String> {
    stats["flow_table"]["embryonic"][field]
        .as_u64()
        .ok_or_else(|| format!("`xdpgate stats --json` has no flow_table.embryonic.{field}"))
}

/// The counters must account for every SYN: each one that reached xdpgate was a new flow
/// decided by allow-echo and became an embryonic flow; none was confirmed (a spoofed source
/// never answers), refused or closed, and none became an established flow. Adds what
/// failed to `failures`; returns a summary.
fn check_counters(before: &Value, after: &Value, syns: u64, failures: &mut Vec<String>) -> String {
    let arrived = iface_packets(after, "ext1") - iface_packets(before, "ext1");
    if arrived != syns {
        failures
            .push(format!("xdpgate counted {arrived} packets on ext1; the generator sent {syns}"));
    }
    let decided = rule_flows(after, "allow-echo") - rule_flows(before, "allow-echo");
    if decided != syns {
        failures.push(format!("allow-echo decided {decided} new flows for {syns} SYNs"));
    }
    let delta = |reason: &str| drop_count(after, reason) - drop_count(before, reason);
    let no_flow = delta("no_flow");
    let other: Vec<String> = drops(after)
        .iter()
        .filter(|(r, _)| r != "no_flow")
        .map(|(r, _)| (r, delta(r)))
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if !other.is_empty() {
        failures.push(format!("drops during the flood: {}", other.join(", ")));
    }
    let mut summary =
        format!("ext1 counted {arrived}, allow-echo decided {decided}, no_flow drops {no_flow}");
    let table = (|| -> Result<String, String> {
        let mut d = std::collections::BTreeMap::new();
        for f in EMBRYONIC {
            let (b, a) = (embryonic(before, f)?, embryonic(after, f)?);
            // Live goes up and down; the others only count up.
            d.insert(f, (b, a, a as i64 - b as i64));
        }
        let cap = embryonic(after, "capacity")?;
        let (flows_before, flows_after) = (
            before["flow_table"]["flows"]["entries"]
                .as_u64()
                .ok_or("no flow_table.flows.entries")?,
            after["flow_table"]["flows"]["entries"]
                .as_u64()
                .ok_or("no flow_table.flows.entries")?,
        );
        let created = d["created"].2;
        if created != syns as i64 {
            failures.push(format!("{created} embryonic flows created for {syns} SYNs"));
        }
        for f in ["confirmed", "refused", "closed"] {
            if d[f].2 != 0 {
                failures
                    .push(format!("{} embryonic flows {f} during a flood of spoofed SYNs", d[f].2));
            }
        }
        // The totals (not only the changes) must add up. (Refused confirmations are events:
        // their flows stay embryonic.)
        let total: u64 =
            ["confirmed", "expired", "closed", "evicted", "live"].iter().map(|f| d[f].1).sum();
        if total != d["created"].1 {
            failures.push(format!(
                "embryonic counters do not add up: created {} but confirmed + expired + \
                 closed + evicted + live = {total}",
                d["created"].1
            ));
        }
        // `capacity` counts flows at two entries each; a SYN waiting for its answer takes one.
        if d["live"].1 > 2 * cap {
            failures.push(format!("{} live embryonic flows, capacity {cap}", d["live"].1));
        }
        // An embryonic flow pushed out before the server's SYN-ACK came back leaves that
        // SYN-ACK without a flow: the only flow-less packets the flood can cause (the server
        // sends one SYN-ACK per SYN, never again: syncookies=2). So no_flow drops <= evicted.
        // (Seen: none at all; an embryo is pushed out only after about 131,072 newer ones.)
        if no_flow > d["evicted"].2.max(0) as u64 {
            failures.push(format!(
                "{no_flow} packets dropped as no_flow, more than the {} embryonic flows \
                 evicted (whose SYN-ACKs find no flow): established packets were dropped",
                d["evicted"].2
            ));
        }
        if flows_after != flows_before {
            failures.push(format!(
                "the established-flow table went from {flows_before} to {flows_after} entries \
                 during the flood"
            ));
        }
        Ok(format!(
            "embryonic: created {created}, evicted {}, expired {}, live {} of {cap}; \
             established-flow entries {flows_before} -> {flows_after}; flow_table_full {}",
            d["evicted"].2,
            d["expired"].2,
            d["live"].1,
            delta("flow_table_full")
        ))
    })();
    match table {
        Ok(s) => summary.push_str(&format!("; {s}")),
        Err(e) => {
            failures.push(e);
            if no_flow > 0 {
                failures.push(format!("{no_flow} packets dropped as no_flow during the flood"));
            }
        }
    }
    summary
}

#[test]
fn syn_flood_spares_idle_and_busy_connections() {
    // Built (if need be) before the clock starts.
    pktgen_bin();
    let started = Instant::now();
    let (per_family, idle_n, busy_n) = if long() { (2_000_000, 20, 4) } else { (1_000_000, 5, 2) };
    let lab = Lab::new();
    let services = Services::new(&lab);

    let mut idle = Vec::new();
    let mut busy = Vec::new();
    for kind in [Kind::Nsg, Kind::Lb, Kind::Snat] {
        for v6 in [false, true] {
            let fam = if v6 { "IPv6" } else { "IPv4" };
            for i in 0..idle_n {
                idle.push(services.open(
                    &lab,
                    kind,
                    v6,
                    format!("idle {} {fam} #{i}", kind.name()),
                ));
            }
            for i in 0..busy_n {
                busy.push(services.open(
                    &lab,
                    kind,
                    v6,
                    format!("busy {} {fam} #{i}", kind.name()),
                ));
            }
        }
    }
    let retried = services.retried.borrow().clone();
    if !retried.is_empty() {
        eprintln!(
            "before the flood, {} connection attempts timed out and were made again: {}",
            retried.len(),
            retried.join("; ")
        );
    }
    let retrans_before: Vec<(u32, u32)> =
        idle.iter().map(|c| (retransmissions(&c.client), retransmissions(&c.server))).collect();
    let streams: Vec<Stream> = busy.into_iter().map(Stream::start).collect();
    // Every stream under way before the flood starts.
    let t = Instant::now();
    while streams.iter().any(|s| s.echoed.load(Ordering::Relaxed) == 0) {
        assert!(t.elapsed() < Duration::from_secs(10), "a busy connection never streamed");
        thread::sleep(Duration::from_millis(10));
    }

    let before = lab.stats();
    let echoed_before: Vec<u64> =
        streams.iter().map(|s| s.echoed.load(Ordering::Relaxed)).collect();
    let t = Instant::now();
    let reports = [flood(&lab, false, per_family), flood(&lab, true, per_family)];
    let flooding = t.elapsed();
    let after = lab.stats();
    let echoed_during: Vec<u64> = streams
        .iter()
        .zip(&echoed_before)
        .map(|(s, b)| s.echoed.load(Ordering::Relaxed) - b)
        .collect();

    let mut failures = Vec::new();
    // Busy: each streamed during the flood, and every byte came back.
    let mut busy_bytes = 0;
    for (s, during) in streams.into_iter().zip(echoed_during) {
        let label = s.label.clone();
        if during == 0 {
            failures.push(format!("{label}: nothing came back during the flood"));
        }
        match s.finish() {
            Ok(b) => busy_bytes += b,
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    // Idle: each carries a message both ways now, without one retransmission. All at once,
    // so that cut connections cost one timeout, not one each.
    // From here on only the connections' own packets cross the gateway (the flood's
    // SYN-ACKs were sent long ago): none may be dropped as no_flow.
    let quiet = lab.stats();
    let labels: Vec<(String, Kind, bool)> =
        idle.iter().map(|c| (c.label(), c.kind, c.v6)).collect();
    let results: Vec<Result<(), String>> = idle
        .into_iter()
        .zip(retrans_before)
        .map(|(mut c, (rc, rs))| {
            thread::spawn(move || {
                let crossed = exchange(&mut c.client, &mut c.server, 0x5a);
                let (dc, ds) = (retransmissions(&c.client) - rc, retransmissions(&c.server) - rs);
                crossed.map_err(|e| {
                    format!("{e} (retransmissions: {dc} by the client, {ds} by the server)")
                })?;
                if dc + ds > 0 {
                    return Err(format!(
                        "the message crossed, but only after {dc} retransmissions by the client \
                         and {ds} by the server: segments were dropped"
                    ));
                }
                Ok(())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let mut cut = Vec::new();
    for kind in [Kind::Nsg, Kind::Lb, Kind::Snat] {
        for v6 in [false, true] {
            let of: Vec<_> = labels
                .iter()
                .zip(&results)
                .filter(|((_, k, f), _)| *k == kind && *f == v6)
                .collect();
            let bad = of.iter().filter(|(_, r)| r.is_err()).count();
            if bad > 0 {
                cut.push(format!(
                    "{bad} of {} idle {} {}",
                    of.len(),
                    kind.name(),
                    if v6 { "IPv6" } else { "IPv4" }
                ));
            }
        }
    }
    let cut_total = results.iter().filter(|r| r.is_err()).count();
    if cut_total > 0 {
        failures.insert(
            0,
            format!("{cut_total} of {} idle connections cut: {}", results.len(), cut.join(", ")),
        );
    }
    for ((label, _, _), r) in labels.iter().zip(&results) {
        if let Err(e) = r {
            failures.push(format!("{label}: {e}"));
        }
    }

    let no_flow_after = drop_count(&lab.stats(), "no_flow") - drop_count(&quiet, "no_flow");
    if no_flow_after > 0 {
        failures.insert(
            usize::from(cut_total > 0),
            format!(
                "{no_flow_after} packets of the connections dropped as no_flow after the flood"
            ),
        );
    }
    let syns: u64 = reports.iter().map(|r| r["tx_packets"].as_u64().unwrap()).sum();
    let counters = check_counters(&before, &after, syns, &mut failures);
    let rates: Vec<String> = reports
        .iter()
        .map(|r| {
            format!(
                "{} {} SYNs sent ({} dropped by the veth) in {:.1} s, {:.0} pps",
                r["family"].as_str().unwrap(),
                r["tx_packets"],
                r["tx_dropped"],
                r["seconds"].as_f64().unwrap(),
                r["pps"].as_f64().unwrap()
            )
        })
        .collect();
    println!(
        "SYN flood: {} ({flooding:.1?} in all); {} idle and {} busy connections ({} bytes \
         echoed; {} setup attempts retried); {cut_total} idle connections cut, {no_flow_after} no_flow drops after the flood; \
         during the flood: {counters} ({:.1?})",
        rates.join("; "),
        results.len(),
        echoed_before.len(),
        busy_bytes,
        retried.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
