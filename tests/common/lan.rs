//! The load-balancer topology: a client on the "internet", the xdpgate gateway, and a
//! subnet of backends on a bridge, each in its own namespace, xdpgate attached in native
//! XDP mode (or at tc ingress: [`Lan::with_hook`]) on both gateway interfaces (`ext0`
//! external, `int0` internal).
//!
//!   client 203.0.113.10 -- ext0 [gw] int0 -- bridge -- backend i 198.51.100.(11 + i)

use super::{Netns, Pins, assert_ingress_hook, run};

pub struct Lan {
    // Field order is drop order: detach (needs the gateway namespace) before the
    // namespaces go.
    pub pins: Pins,
    pub client: Netns,
    pub gw: Netns,
    pub switch: Netns,
    /// Backend i has address 198.51.100.(11 + i) on its `eth0`, default route via the gateway.
    pub backends: Vec<Netns>,
}

/// Address of backend `i`.
pub fn backend_addr(i: usize) -> String {
    format!("198.51.100.{}", 11 + i)
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

impl Lan {
    pub fn new(backends: usize) -> Self {
        Self::with_hook(backends, "xdp")
    }

    /// The topology attached on `hook` (`xdp` or `tc`). With `tc` the hosts keep their
    /// checksum offload and TSO (what XDP forwarding breaks), and the gateway turns GRO on,
    /// so its programs see GRO aggregates.
    pub fn with_hook(backends: usize, hook: &str) -> Self {
        let xdp = hook == "xdp";
        let client = Netns::new("lanc");
        let gw = Netns::new("lang");
        let switch = Netns::new("lans");
        link(&client, "eth0", &gw, "ext0");
        link(&gw, "int0", &switch, "p0");
        switch.exec("ip", &["link", "add", "br0", "type", "bridge"]);
        switch.exec("ip", &["link", "set", "br0", "up"]);
        client.exec("ip", &["addr", "add", "203.0.113.10/24", "dev", "eth0"]);
        gw.exec("ip", &["addr", "add", "203.0.113.1/24", "dev", "ext0"]);
        gw.exec("ip", &["addr", "add", "198.51.100.1/24", "dev", "int0"]);
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        for (ns, dev) in [(&client, "eth0"), (&gw, "ext0"), (&gw, "int0"), (&switch, "p0")] {
            ns.exec("ip", &["link", "set", dev, "up"]);
        }
        switch.exec("ip", &["link", "set", "p0", "master", "br0"]);
        client.exec("ip", &["route", "add", "default", "via", "203.0.113.1"]);
        // Frames XDP redirects into a veth are received by its peer's NAPI instance, which
        // veth only runs with GRO on (or an XDP program) on that peer. And a packet sent by
        // a local stack through veth may carry only a partial checksum (offload); XDP
        // forwarding hands on the frame without the note that completes it. Real NICs
        // need neither setting.
        client.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", if xdp { "off" } else { "on" }]);
        switch.exec("ethtool", &["-K", "p0", "gro", "on"]);
        if !xdp {
            for dev in ["ext0", "int0"] {
                gw.exec("ethtool", &["-K", dev, "gro", "on"]);
            }
        }

        let backends = (0..backends)
            .map(|i| {
                let ns = Netns::new("lanb");
                let port = format!("p{}", i + 1);
                link(&ns, "eth0", &switch, &port);
                switch.exec("ip", &["link", "set", &port, "master", "br0"]);
                switch.exec("ip", &["link", "set", &port, "up"]);
                ns.exec("ip", &["addr", "add", &format!("{}/24", backend_addr(i)), "dev", "eth0"]);
                ns.exec("ip", &["link", "set", "eth0", "up"]);
                let tx = if xdp { "off" } else { "on" };
                ns.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", tx]);
                ns.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
                ns
            })
            .collect();

        let pins = Pins::in_netns(&gw);
        for (dev, role) in [("ext0", "external"), ("int0", "internal")] {
            pins.xdpgate(&["attach", "--iface", dev, "--role", role, "--hook", hook]);
            assert_ingress_hook(&pins, &gw, dev, hook);
        }
        Self { pins, client, gw, switch, backends }
    }
}
