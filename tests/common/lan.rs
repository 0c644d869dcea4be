//! The load-balancer topology: a client on the "internet", the xdpgate gateway, and a
//! subnet of backends on a bridge, each in its own namespace, xdpgate attached in native
//! mode on both gateway interfaces (`ext0` external, `int0` internal).
//!
//!   client 203.0.113.10 -- ext0 [gw] int0 -- bridge -- backend i 198.51.100.(11 + i)

use super::{Netns, Pins, run};

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
        client.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", "off"]);
        switch.exec("ethtool", &["-K", "p0", "gro", "on"]);

        let backends = (0..backends)
            .map(|i| {
                let ns = Netns::new("lanb");
                let port = format!("p{}", i + 1);
                link(&ns, "eth0", &switch, &port);
                switch.exec("ip", &["link", "set", &port, "master", "br0"]);
                switch.exec("ip", &["link", "set", &port, "up"]);
                ns.exec("ip", &["addr", "add", &format!("{}/24", backend_addr(i)), "dev", "eth0"]);
                ns.exec("ip", &["link", "set", "eth0", "up"]);
                ns.exec("ethtool", &["-K", "eth0", "gro", "on", "tx", "off"]);
                ns.exec("ip", &["route", "add", "default", "via", "198.51.100.1"]);
                ns
            })
            .collect();

        let pins = Pins::in_netns(&gw);
        pins.xdpgate(&["attach", "--iface", "ext0", "--role", "external"]);
        pins.xdpgate(&["attach", "--iface", "int0", "--role", "internal"]);
        Self { pins, client, gw, switch, backends }
    }
}
