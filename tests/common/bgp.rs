//! BGP in the tests' namespaces: a BIRD daemon per namespace, the router's configuration
//! (ECMP: the gateways' equal paths merged into one multipath kernel route) and the
//! router's next hops for the frontends, polled until they are what a step waits for.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{Netns, unique};

/// A BIRD daemon in a namespace with its own config, control socket and pid file; killed
/// and its files removed on drop (a failing test included).
pub struct Bird {
    child: Child,
    dir: PathBuf,
}

/// Whether `bird` is installed (setup.sh installs Debian's bird2); the tests that need it
/// skip with a message otherwise.
pub fn bird_installed() -> bool {
    Command::new("bird").arg("--version").output().is_ok()
}

impl Bird {
    pub fn start(ns: &Netns, config: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("bird"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config).unwrap();
        // -f: in the foreground, so this child is the daemon.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bird");
        Self { child, dir }
    }

    /// Freezes the daemon (SIGSTOP): it sends nothing more and its sessions stay open, as a
    /// hung or cut-off node's do, so only the peers' hold timers end them.
    pub fn freeze(&self) {
        // Our own child (`ip netns exec` execs bird in its place).
        super::sigstop(self.child.id());
    }

    /// `birdc show protocols` and `show route`, for a failure's message.
    pub fn show(&self) -> String {
        let ctl = self.dir.join("bird.ctl");
        let mut out = String::new();
        for what in ["protocols", "route"] {
            let o = Command::new("birdc").arg("-s").arg(&ctl).args(["show", what]).output();
            out += &o.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stdout).into());
        }
        out
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        // SIGKILL: as a crashed daemon ends (its sessions' sockets closed by the kernel).
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One gateway as the router peers with it: its addresses on the link (IPv4, IPv6).
pub struct Peer {
    pub v4: String,
    pub v6: String,
}

/// The router (AS 65000): BGP from each gateway (AS 65001) over IPv4 and over IPv6, the best
/// paths of each family merged into one multipath route; the sessions' hold time `hold`
/// seconds, keepalives every third of it. A session ended by an error (a link down, a hold
/// timer) starts again after 1 s, not BIRD's default 60 s (as deploy/bird/router.conf).
pub fn router_config(peers: &[Peer], hold: u16) -> String {
    let keepalive = (hold / 3).max(1);
    let mut out = "router id 203.0.113.1;\nprotocol device {}\n".to_owned();
    for family in ["ipv4", "ipv6"] {
        out += &format!(
            "protocol kernel {{\n  merge paths on;\n  {family} {{ import none; export all; }};\n}}\n"
        );
    }
    for (i, p) in peers.iter().enumerate() {
        for (family, addr) in [("ipv4", &p.v4), ("ipv6", &p.v6)] {
            out += &format!(
                "protocol bgp gw{i}_{family} {{\n  local as 65000;\n  neighbor {addr} as 65001;\n  \
                 hold time {hold};\n  keepalive time {keepalive};\n  connect delay time 1;\n  \
                 connect retry time 2;\n  error wait time 1, 60;\n  graceful restart off;\n  \
                 {family} {{ import all; export none; }};\n}}\n"
            );
        }
    }
    out
}

/// The router's ECMP hash: the five-tuple, for both families. Policy 3 with the fields, not
/// policy 1: over veth a packet keeps the hash its sending socket gave it, which policy 1
/// reuses and TCP changes on every retransmission timeout (moving the flow to another path).
pub fn hash_five_tuple(router: &Netns) {
    // 0x37: source and destination address, protocol, source and destination port.
    for family in ["ipv4", "ipv6"] {
        router.exec("sysctl", &["-qw", &format!("net.{family}.fib_multipath_hash_policy=3")]);
        router.exec("sysctl", &["-qw", &format!("net.{family}.fib_multipath_hash_fields=0x37")]);
    }
}

/// The next hops of the router's routes to `prefixes` (`(label, prefix)`, the prefix with
/// its length), as (label, the router's interface towards the gateway): BIRD may give IPv6
/// routes a gateway's link-local address, the interface names the gateway either way.
pub fn next_hops(
    router: &Netns,
    prefixes: &[(&'static str, &str)],
) -> BTreeSet<(&'static str, String)> {
    let mut hops = BTreeSet::new();
    for &(label, prefix) in prefixes {
        let flag = if prefix.contains(':') { "-6" } else { "-4" };
        let out = router.exec("ip", &[flag, "-j", "route", "show", prefix]);
        let routes: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        for r in routes.as_array().into_iter().flatten() {
            let nexthops = r["nexthops"].as_array().cloned().unwrap_or_else(|| vec![r.clone()]);
            for n in nexthops {
                hops.extend(n["dev"].as_str().map(|dev| (label, dev.to_owned())));
            }
        }
    }
    hops
}

/// Every prefix of `prefixes` through each of the router's interfaces `ifaces`.
pub fn hops_through(
    prefixes: &[(&'static str, &str)],
    ifaces: &[&str],
) -> BTreeSet<(&'static str, String)> {
    prefixes
        .iter()
        .flat_map(|&(label, _)| ifaces.iter().map(move |i| (label, (*i).to_owned())))
        .collect()
}

/// Polls the router's table until the next hops of `prefixes` are `want`, within 30 s;
/// returns how long that took. On a timeout, panics with `what`, the hops seen and what
/// `explain` says (the gateways' state).
pub fn wait_next_hops(
    router: &Netns,
    prefixes: &[(&'static str, &str)],
    want: &BTreeSet<(&'static str, String)>,
    what: &str,
    explain: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    loop {
        let now = next_hops(router, prefixes);
        if &now == want {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!("{what}: next hops {now:?}, wanted {want:?}{}", explain());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
