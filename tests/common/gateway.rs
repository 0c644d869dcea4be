//! The usual end-to-end topology: a client on the "internet", the xdpgate gateway, and a
//! server in the protected subnet, each in its own namespace, IPv4 and IPv6, with xdpgate
//! attached on both gateway interfaces: in native XDP mode, or at tc ingress ([`Gateway::tc`]).
//!
//!   client 203.0.113.10 2001:db8:2::10 -- [gw] -- server 198.51.100.10 2001:db8:1::10

use std::path::PathBuf;

use super::{Netns, Pins, assert_ingress_hook, unique, veth};

/// The server's subnet allowing DNS and web in and denying SSH, a load balancer in front of
/// the server (192.0.2.10:80 to port 8080) and a NAT gateway (192.0.2.100) for the subnet.
pub const TRANSLATING_POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: servers
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-dns, priority: 100, direction: inbound, access: allow, protocol: udp,
         source: Internet, destination: "*", destination_ports: 5353}
      - {name: allow-web, priority: 110, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 8080}
      - {name: deny-ssh, priority: 200, direction: inbound, access: deny, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 22}
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: web, backends: [198.51.100.10]}
    rules:
      - {name: http, frontend: vip, protocol: tcp, frontend_port: 80, backend_port: 8080,
         backend_pool: web}
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

/// A UDP load balancer in front of the server (192.0.2.10:53 to its port 5353, where
/// nothing listens unless a test does) and a NAT gateway (192.0.2.100) for its subnet.
pub const UDP_LB_AND_NAT_POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
load_balancers:
  - name: lb
    frontends:
      - {name: vip, address: 192.0.2.10}
    backend_pools:
      - {name: dns, backends: [198.51.100.10]}
    rules:
      - {name: dns, frontend: vip, protocol: udp, frontend_port: 53, backend_port: 5353,
         backend_pool: dns}
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

pub const CLIENT4: &str = "203.0.113.10";
pub const CLIENT6: &str = "2001:db8:2::10";
pub const SERVER4: &str = "198.51.100.10";
pub const SERVER6: &str = "2001:db8:1::10";

pub struct Gateway {
    // Field order is drop order: detach (needs the gateway namespace) before the
    // namespaces go.
    pub pins: Pins,
    pub client: Netns,
    pub gw: Netns,
    pub server: Netns,
    /// Gateway interfaces: facing the client (external) and the server (internal).
    pub ext: String,
    pub int: String,
    /// Their peers: the client's and the server's interface.
    pub client_if: String,
    pub server_if: String,
    /// Where the test writes its policy files (removed on drop).
    pub dir: PathBuf,
}

impl Gateway {
    pub fn new() -> Self {
        Self::attached_with(&[])
    }

    /// The topology attached with `--hook tc`, offloads as veth has them (TSO, checksum
    /// offload: what XDP forwarding breaks) and GRO on at the gateway, so its programs see
    /// GRO aggregates.
    pub fn tc() -> Self {
        Self::build(&[], ["tc", "tc"])
    }

    /// The topology with the external interface attached at `ext` and the internal one at
    /// `int` (hooks `xdp` or `tc`), GRO on at the tc ones.
    pub fn with_hooks(ext: &str, int: &str) -> Self {
        Self::build(&[], [ext, int])
    }

    /// The topology with `extra` added to each `xdpgate attach` (table sizes, say).
    pub fn attached_with(extra: &[&str]) -> Self {
        Self::build(extra, ["xdp", "xdp"])
    }

    fn build(extra: &[&str], hooks: [&str; 2]) -> Self {
        let client = Netns::new("gwc");
        let gw = Netns::new("gwg");
        let server = Netns::new("gws");
        let (client_if, ext) = veth(
            &client,
            &format!("{CLIENT4}/24,{CLIENT6}/64"),
            &gw,
            "203.0.113.1/24,2001:db8:2::1/64",
        );
        let (int, server_if) = veth(
            &gw,
            "198.51.100.1/24,2001:db8:1::1/64",
            &server,
            &format!("{SERVER4}/24,{SERVER6}/64"),
        );
        gw.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        gw.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        for (ns, v4, v6) in
            [(&client, "203.0.113.1", "2001:db8:2::1"), (&server, "198.51.100.1", "2001:db8:1::1")]
        {
            ns.exec("ip", &["route", "add", "default", "via", v4]);
            ns.exec("ip", &["-6", "route", "add", "default", "via", v6]);
        }
        let pins = Pins::in_netns(&gw);
        for ((iface, role), hook) in [(&ext, "external"), (&int, "internal")].into_iter().zip(hooks)
        {
            if hook == "tc" {
                gw.exec("ethtool", &["-K", iface, "gro", "on"]);
            }
            let args =
                [&["attach", "--iface", iface, "--role", role, "--hook", hook][..], extra].concat();
            let out = pins.xdpgate(&args);
            assert!(out.contains("attached"), "{out}");
            assert_ingress_hook(&pins, &gw, iface, hook);
        }
        let dir = std::env::temp_dir().join(unique("gwpol"));
        std::fs::create_dir_all(&dir).expect("policy dir");
        Self { pins, client, gw, server, ext, int, client_if, server_if, dir }
    }

    /// Readies the client and the server for frames the gateway's XDP redirects to them
    /// (load-balanced and translated flows): a veth needs GRO (NAPI) on the receiving peer,
    /// and senders must complete their checksums (no offload note survives a redirect).
    pub fn take_redirects(&self) {
        for (ns, ifname) in [(&self.client, &self.client_if), (&self.server, &self.server_if)] {
            ns.exec("ethtool", &["-K", ifname, "gro", "on", "tx", "off"]);
        }
    }

    /// Turns IPv6 off on the four ends of the links, for a test that compares counters
    /// across steps that send no packet: a link's IPv6 sends multicast listener reports of
    /// its own now and then, which move the gateway's interface counters.
    pub fn without_ipv6(self) -> Self {
        for (ns, ifname) in [
            (&self.client, &self.client_if),
            (&self.gw, &self.ext),
            (&self.gw, &self.int),
            (&self.server, &self.server_if),
        ] {
            ns.exec("sysctl", &["-qw", &format!("net.ipv6.conf.{ifname}.disable_ipv6=1")]);
        }
        self
    }

    /// Writes a policy file; returns its path.
    pub fn write_policy(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write policy");
        path
    }

    /// Applies a policy with the CLI; returns its output.
    pub fn apply(&self, name: &str, text: &str) -> String {
        let path = self.write_policy(name, text);
        self.pins.xdpgate(&["apply", path.to_str().unwrap()])
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
