//! Helpers shared by the kernel and end-to-end tests: network namespaces and veth pairs
//! that remove themselves, pin directories that detach and vanish, threads that run inside
//! a namespace, and the xdpgate and xdpgate-pktgen binaries.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use xdpgate_dataplane::PinDir;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A child process, killed and reaped when dropped (a failing test's included).
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Waits for it to exit and collects its output (`Child::wait_with_output`).
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.0.take().expect("not waited for yet").wait_with_output()
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not waited for yet")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not waited for yet")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops process `pid` (SIGSTOP) and returns once it is stopped: the signal is
/// asynchronous, and a test that goes on at once may race what the process still does.
pub fn sigstop(pid: u32) {
    // SAFETY: kill(2) with a signal; the callers pass their own children.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
    let stopped = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command's closing parenthesis: `T` for stopped.
        stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))
    };
    let start = std::time::Instant::now();
    while !stopped() {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{pid} did not stop");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `XDPGATE_LONG=1`: the longer variants of the tests that have one.
pub fn long() -> bool {
    std::env::var_os("XDPGATE_LONG").is_some_and(|v| v == "1")
}

/// A short name unique to this process and call, fit for interfaces (15 chars max).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The whole lines of a file another process appends to (a flow log): a last line not
/// ended yet, in the middle of a write, is left for the next read.
#[allow(dead_code)]
pub fn whole_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
    whole.lines().map(str::to_owned).collect()
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace deleted (with its interfaces) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.exec("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace, panicking if it fails.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace and returns its output, whatever its status.
    pub fn try_exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .expect("spawn ip netns exec")
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }

    /// The MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let out = self.exec("cat", &[&format!("/sys/class/net/{ifname}/address")]);
        let text = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> =
            text.trim().split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        bytes.try_into().unwrap()
    }
}

/// Writes `frame` out of `ifname` of namespace `ns` through an AF_PACKET socket, with the
/// interface's MAC address as source and `dst_mac` as destination.
pub fn send_frame(
    ns: &Netns,
    ifname: &str,
    dst_mac: [u8; 6],
    frame: Vec<u8>,
) -> Result<(), String> {
    send_raw(ns, ifname, dst_mac, frame, None)
}

/// Writes `frame` as [`send_frame`] does, but as a local sender with checksum offload
/// sends it: marked CHECKSUM_PARTIAL (by the packet socket's virtio-net header) from
/// `csum.0`, the checksum field at `csum.0 + csum.1` left for the device (or whoever
/// receives it across a veth, trusting the mark) to complete (see
/// `packet::offload_checksum`).
pub fn send_frame_partial(
    ns: &Netns,
    ifname: &str,
    dst_mac: [u8; 6],
    frame: Vec<u8>,
    csum: (u16, u16),
) -> Result<(), String> {
    send_raw(ns, ifname, dst_mac, frame, Some(csum))
}

fn send_raw(
    ns: &Netns,
    ifname: &str,
    dst_mac: [u8; 6],
    frame: Vec<u8>,
    csum: Option<(u16, u16)>,
) -> Result<(), String> {
    let mut buf = Vec::new();
    if let Some((start, offset)) = csum {
        // struct virtio_net_hdr (little-endian, as the host's): flags NEEDS_CSUM, no GSO
        // (a packet socket's GSO packets are "dodgy", which veth cannot take, and the kernel
        // cannot cut an IP-in-IP one not marked as such), hdr_len, gso_size, csum_start,
        // csum_offset.
        buf.extend_from_slice(&[1, 0]);
        for v in [0u16, 0, start, offset] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    let eth = buf.len();
    buf.extend_from_slice(&frame);
    buf[eth..eth + 6].copy_from_slice(&dst_mac);
    buf[eth + 6..eth + 12].copy_from_slice(&ns.mac(ifname));
    let ifname = ifname.to_string();
    let sent = ns.run(move || {
        let ifindex = xdpgate_dataplane::ifindex(&ifname).unwrap();
        // SAFETY: plain socket calls with valid arguments; the fd is closed before return.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
            if csum.is_some() {
                let on: libc::c_int = 1;
                let len = std::mem::size_of::<libc::c_int>() as u32;
                let rc = libc::setsockopt(
                    fd,
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&raw const on).cast(),
                    len,
                );
                assert_eq!(rc, 0, "PACKET_VNET_HDR: {}", std::io::Error::last_os_error());
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = u16::from_be_bytes([buf[eth + 12], buf[eth + 13]]).to_be();
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            let n = libc::sendto(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            (n, err)
        }
    });
    if sent.0 > 0 { Ok(()) } else { Err(format!("sendto(AF_PACKET): {}", sent.1)) }
}

/// Retransmitted segments of a socket so far (TCP_INFO `tcpi_total_retrans`).
pub fn retransmissions(s: &std::net::TcpStream) -> u32 {
    tcp_info(s).tcpi_total_retrans
}

/// Segments a socket has sent that its peer has not acknowledged yet (`tcpi_unacked`).
pub fn unacked(s: &std::net::TcpStream) -> u32 {
    tcp_info(s).tcpi_unacked
}

fn tcp_info(s: &std::net::TcpStream) -> libc::tcp_info {
    use std::os::fd::AsRawFd;
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a tcp_info of `len` bytes; the descriptor is a TCP socket we own.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}

/// Runs `f` on a new thread that has entered the namespace named `name`.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let name = name.to_owned();
    std::thread::spawn(move || {
        xdpgate_dataplane::netns::enter(&name).expect("enter netns");
        f()
    })
}

/// Runs `f` inside the namespace named `name` and waits for it.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(name, f).join().expect("thread in netns panicked")
}

/// Runs `f` on a thread inside a fresh namespace (its name passed in) with forwarding on
/// or off, so test runs' FIB lookups answer alike on every machine.
pub fn isolated<T: Send + 'static>(
    forwarding: bool,
    f: impl FnOnce(String) -> T + Send + 'static,
) -> T {
    let ns = Netns::new("xgis");
    let on = if forwarding { "1" } else { "0" };
    for key in [
        "net.ipv4.ip_forward",
        "net.ipv4.conf.all.forwarding",
        "net.ipv4.conf.lo.forwarding",
        "net.ipv6.conf.all.forwarding",
    ] {
        ns.exec("sysctl", &["-qw", &format!("{key}={on}")]);
    }
    let name = ns.name.clone();
    let out = ns.spawn(move || f(name)).join();
    drop(ns);
    out.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins two namespaces with a veth pair, `a_addr`/`b_addr` as CIDR addresses (v4 or v6,
/// several comma-separated). Returns the interface names (in a, in b).
pub fn veth(a: &Netns, a_addrs: &str, b: &Netns, b_addrs: &str) -> (String, String) {
    let (ia, ib) = (unique("va"), unique("vb"));
    run(
        "ip",
        &[
            "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns",
            &b.name,
        ],
    );
    for (ns, ifname, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs.split(',').filter(|s| !s.is_empty()) {
            // nodad: IPv6 addresses usable at once.
            let mut args = vec!["addr", "add", addr, "dev", ifname.as_str()];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.exec("ip", &args);
        }
        // No router solicitations: a host sends them for about 9 s after its link comes up,
        // and such a packet in the middle of a test moves the counters the test reads.
        let rs = format!("net.ipv6.conf.{ifname}.router_solicitations=0");
        ns.exec("sysctl", &["-qw", &rs]);
        ns.exec("ip", &["link", "set", ifname, "up"]);
    }
    (ia, ib)
}

/// A pin directory of its own for one test, with everything in it detached and removed on
/// drop.
pub struct Pins {
    pub dir: PinDir,
    /// Namespace the attachments live in, for `xdpgate --netns`.
    pub netns: Option<String>,
}

impl Pins {
    pub fn new() -> Self {
        let dir = PinDir::new(format!("/sys/fs/bpf/{}", unique("xgtest")));
        dir.ensure().expect("pin dir");
        Self { dir, netns: None }
    }

    pub fn in_netns(ns: &Netns) -> Self {
        let mut pins = Self::new();
        pins.netns = Some(ns.name.clone());
        pins
    }

    /// Runs the xdpgate binary against this pin directory; panics on failure.
    pub fn xdpgate(&self, args: &[&str]) -> String {
        let out = self.try_xdpgate(args);
        assert!(
            out.status.success(),
            "xdpgate {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Applies policy `text` one-shot with the CLI (`xdpgate apply`); returns its output.
    pub fn apply(&self, text: &str) -> String {
        let file = std::env::temp_dir().join(format!("{}.yaml", unique("policy")));
        std::fs::write(&file, text).expect("write policy");
        let out = self.xdpgate(&["apply", file.to_str().unwrap()]);
        let _ = std::fs::remove_file(&file);
        out
    }

    /// The running agent's state record (`agent.json`), if one was written. An agent writes
    /// it once nothing at its start can fail any more: its `pid` names the agent that
    /// finished starting.
    pub fn agent_record(&self) -> Option<serde_json::Value> {
        let path = xdpgate_dataplane::state::dir(&self.dir).join("agent.json");
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Has the agent with process id `pid` finished starting (see `agent_record`)?
    pub fn agent_started(&self, pid: u32) -> bool {
        self.agent_record().is_some_and(|r| r["pid"].as_u64() == Some(u64::from(pid)))
    }

    pub fn try_xdpgate(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("spawn xdpgate")
    }

    /// `xdpgate` against this pin directory, in its namespace.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(xdpgate_bin());
        cmd.arg("--pin-dir").arg(self.dir.path());
        if let Some(ns) = &self.netns {
            cmd.args(["--netns", ns]);
        }
        cmd
    }

    /// The agent, `xdpgate run` of `policy`, metrics off, its output discarded: callers add
    /// their options (`--flow-log`, a file for its log) and spawn it.
    pub fn agent(&self, policy: &Path) -> Command {
        let mut cmd = self.command();
        cmd.args(["run", "--metrics-addr", "off", "--policy"]).arg(policy);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs; then the map pins can go.
        let _ = self.try_xdpgate(&["detach", "--all"]);
        let _ = std::fs::remove_dir_all(self.dir.path());
        let _ = std::fs::remove_dir_all(xdpgate_dataplane::state::dir(&self.dir));
    }
}

/// Checks that xdpgate's ingress pipeline runs on `iface` of `ns` at `hook`: `xdp` (native
/// XDP, as `ip` shows it) or `tc` (`status` reports its tcx link, `ip` no XDP program).
pub fn assert_ingress_hook(pins: &Pins, ns: &Netns, iface: &str, hook: &str) {
    let link =
        String::from_utf8_lossy(&ns.exec("ip", &["-d", "link", "show", iface]).stdout).into_owned();
    let status: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["status", "--json"])).expect("status json");
    let i = status["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["interface"] == iface))
        .unwrap_or_else(|| panic!("{iface} missing from status: {status}"));
    assert_eq!(i["hook"], hook, "{iface}: {i}");
    match hook {
        "xdp" => assert!(
            link.contains("prog/xdp") && !link.contains("xdpgeneric"),
            "not native XDP on {iface}: {link}"
        ),
        "tc" => {
            assert!(!link.contains("prog/xdp"), "an XDP program on tc-attached {iface}: {link}");
            assert_eq!(
                (i["place"].as_str(), i["program"].as_str(), i["xdp_mode"].as_str()),
                (Some("here"), Some("xdpgate_tc"), Some("none")),
                "{iface}: {i}"
            );
        }
        _ => panic!("no hook {hook}"),
    }
}

pub mod agent;
pub mod bgp;
pub mod crossfamily;
pub mod echo;
pub mod echo_conns;
pub mod gateway;
pub mod kernel;
pub mod lan;
pub mod packet;
pub mod policygen;
pub mod rng;
pub mod tcp;

pub fn xdpgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_xdpgate"))
}

/// The traffic generator, a package of its own. `cargo test --workspace` (what `cargo xtask
/// test` runs) builds it beside the xdpgate binary, for its own integration test, in the
/// same build; a test run of this package alone builds it here once (a separate build,
/// with features unified differently, so it may rebuild dependencies).
pub fn pktgen_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let beside = xdpgate_bin().with_file_name("xdpgate-pktgen");
        if beside.exists() {
            return beside;
        }
        let dir = xdpgate_bin().parent().and_then(|d| d.file_name()).map(|d| d.to_owned());
        let profile = match dir.as_ref().and_then(|d| d.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let mut cargo = Command::new(env!("CARGO"));
        // Without the variables Cargo sets for this test run: build scripts that watch one
        // (ring's watches CARGO_MANIFEST_DIR and OUT_DIR) would rerun, and everything above
        // them be rebuilt, on every call.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || [
                    "OUT_DIR",
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&key.as_ref())
            {
                cargo.env_remove(key.as_ref());
            }
        }
        let out = cargo
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "-p", "xdpgate-pktgen", "--bin", "xdpgate-pktgen", "--profile"])
            .arg(&profile)
            .arg("--message-format=json-render-diagnostics")
            .stderr(Stdio::inherit())
            .output()
            .expect("spawn cargo build -p xdpgate-pktgen");
        assert!(out.status.success(), "cargo build -p xdpgate-pktgen failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| {
                m["reason"] == "compiler-artifact" && m["target"]["name"] == "xdpgate-pktgen"
            })
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no xdpgate-pktgen executable")
    })
    .clone()
}
