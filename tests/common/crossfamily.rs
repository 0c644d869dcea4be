//! `icmp` by address family: ICMP is protocol 1 under IPv4 and next header 58 under IPv6.
//! IPv4 packets of protocol 58 and IPv6 packets of next header 1 are plain protocols that
//! only `any` rules match. One policy and the packets that tell the two apart, for the
//! kernel and verify-flow tests.

use super::packet::{L4, frame_vlan};

/// Inbound: `pingable` allows ICMP over its DenyAll default; `no-ping` denies ICMP over an
/// allow-any rule.
pub const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24, 2001:db8:1::/64]
nsgs:
  - name: pingable
    subnets: [198.51.100.0/25, 2001:db8:1::/65]
    rules:
      - {name: allow-icmp, priority: 100, direction: inbound, access: allow, protocol: icmp,
         source: ["*"], destination: ["*"]}
  - name: no-ping
    subnets: [198.51.100.128/25, "2001:db8:1:0:8000::/65"]
    rules:
      - {name: deny-icmp, priority: 100, direction: inbound, access: deny, protocol: icmp,
         source: ["*"], destination: ["*"]}
      - {name: allow-any, priority: 200, direction: inbound, access: allow, protocol: any,
         source: ["*"], destination: ["*"]}
"#;

pub const PINGABLE4: &str = "198.51.100.10";
pub const PINGABLE6: &str = "2001:db8:1::10";
pub const NO_PING4: &str = "198.51.100.200";
pub const NO_PING6: &str = "2001:db8:1:0:8000::10";

/// One inbound packet and the answer the policy gives it.
#[derive(Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub src: &'static str,
    pub dst: &'static str,
    pub proto: u8,
    pub allowed: bool,
    /// The deciding rule.
    pub rule: &'static str,
}

impl Case {
    pub fn v6(&self) -> bool {
        self.dst.contains(':')
    }

    /// Whether `proto` is ICMP of the packet's own family.
    pub fn is_icmp(&self) -> bool {
        self.proto == if self.v6() { 58 } else { 1 }
    }

    /// An echo request. A cross-family one is the other family's echo request carried as
    /// a plain protocol: the bytes that would fool a family-blind parser.
    /// The destination's answer to [`Case::frame`]: an echo reply for an echo.
    pub fn answer(&self, id: u16) -> Vec<u8> {
        if self.is_icmp() {
            return frame_vlan(self.dst, self.src, L4::EchoReply(id), &[], b"xdpgate");
        }
        Case { src: self.dst, dst: self.src, ..*self }.frame(id)
    }

    pub fn frame(&self, id: u16) -> Vec<u8> {
        if self.is_icmp() {
            return frame_vlan(self.src, self.dst, L4::Echo(id), &[], b"xdpgate");
        }
        let kind = if self.proto == 58 { 128 } else { 8 };
        let [hi, lo] = id.to_be_bytes();
        let payload = [kind, 0, 0, 0, hi, lo, 0, 1, b'x', b'g'];
        frame_vlan(self.src, self.dst, L4::Raw(self.proto), &[], &payload)
    }
}

pub const CASES: [Case; 8] = [
    Case {
        name: "icmp echo to pingable",
        src: "203.0.113.1",
        dst: PINGABLE4,
        proto: 1,
        allowed: true,
        rule: "allow-icmp",
    },
    Case {
        name: "icmpv6 echo to pingable",
        src: "2001:db8:2::1",
        dst: PINGABLE6,
        proto: 58,
        allowed: true,
        rule: "allow-icmp",
    },
    Case {
        name: "ipv4 protocol 58 to pingable",
        src: "203.0.113.2",
        dst: PINGABLE4,
        proto: 58,
        allowed: false,
        rule: "DenyAllInBound",
    },
    Case {
        name: "ipv6 next header 1 to pingable",
        src: "2001:db8:2::2",
        dst: PINGABLE6,
        proto: 1,
        allowed: false,
        rule: "DenyAllInBound",
    },
    Case {
        name: "icmp echo to no-ping",
        src: "203.0.113.3",
        dst: NO_PING4,
        proto: 1,
        allowed: false,
        rule: "deny-icmp",
    },
    Case {
        name: "icmpv6 echo to no-ping",
        src: "2001:db8:2::3",
        dst: NO_PING6,
        proto: 58,
        allowed: false,
        rule: "deny-icmp",
    },
    Case {
        name: "ipv4 protocol 58 to no-ping",
        src: "203.0.113.4",
        dst: NO_PING4,
        proto: 58,
        allowed: true,
        rule: "allow-any",
    },
    Case {
        name: "ipv6 next header 1 to no-ping",
        src: "2001:db8:2::4",
        dst: NO_PING6,
        proto: 1,
        allowed: true,
        rule: "allow-any",
    },
];
