//! NAT gateway tables: which subnets are translated through which gateway, the gateways'
//! public addresses and port ranges, and the translations themselves.

use crate::{
    pod,
    stats::{Counter, DropReason},
};

pub const MAX_NAT_GATEWAYS: u32 = 16;
pub const MAX_PUBLIC_ADDRS: usize = 16;
/// Translations held (two entries each: the forward and the reply 5-tuple).
pub const NAT_ENTRIES: u32 = 262_144;
/// Ports tried for one new flow before giving up (the pool is full or nearly so).
pub const NAT_PROBES: u32 = 32;

/// Key of the `NAT_SUBNETS`, `VNET` and `NAT_PUBLIC` prefix tries: family, then the
/// network-order address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u32; 4],
}

/// Bits of an `AddrKey` before the address.
pub const ADDR_KEY_HEADER_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatGatewayConfig {
    pub addrs: [[u32; 4]; MAX_PUBLIC_ADDRS],
    /// 4 or 6 per address.
    pub families: [u8; MAX_PUBLIC_ADDRS],
    pub n_addrs: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Idle timeouts of its translations in seconds: its flows live as long.
    pub tcp_idle_s: u16,
    pub udp_idle_s: u16,
}

impl Default for NatGatewayConfig {
    fn default() -> Self {
        Self {
            addrs: [[0; 4]; MAX_PUBLIC_ADDRS],
            families: [0; MAX_PUBLIC_ADDRS],
            n_addrs: 0,
            port_lo: 0,
            port_hi: 0,
            tcp_idle_s: 0,
            udp_idle_s: 0,
        }
    }
}

/// A translation, stored under both of its 5-tuples. Under the forward tuple (private
/// host to remote) it says the source becomes `addr`:`port`; under the reply tuple (remote
/// to public address and port) it says the destination becomes `addr`:`port` again. The
/// reply-tuple entry is inserted first, without overwriting, which is what claims the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u32; 4],
    pub port: u16,
    /// `NAT_SRC` under the forward tuple, `NAT_DST` under the reply tuple.
    pub kind: u8,
    pub gateway: u8,
    /// `NAT_ACTIVE` or `NAT_COOLDOWN`.
    pub state: u32,
    /// Creation time (`bpf_ktime_get_ns`); for a cooling-down entry, when it may go.
    pub time_ns: u64,
}

pub const NAT_ACTIVE: u32 = 0;
/// Released by the agent, kept so the port is not reused for the same destination yet.
pub const NAT_COOLDOWN: u32 = 1;

/// What one NAT gateway translated and dropped (`NAT_TRAFFIC`, per CPU, by gateway index),
/// as Azure's NAT gateway metrics count it: packets and bytes each way and dropped packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatTraffic {
    /// Indexed by `nsg::DIR_*`: outbound (a private host's packets to the internet, source
    /// translated) and inbound (their replies, destination translated). Bytes count from the
    /// IP header on (no link-layer header), as Azure's do.
    pub translated: [Counter; 2],
    /// Packets the NAT stage dropped, by [`NAT_DROPS`] index.
    pub dropped: [u64; NAT_DROP_REASONS],
}

/// The drop reasons that belong to a NAT gateway, in `NatTraffic::dropped` order.
pub const NAT_DROP_REASONS: usize = 2;
pub const NAT_DROPS: [DropReason; NAT_DROP_REASONS] =
    [DropReason::NatExhausted, DropReason::NatUnmatched];

pod!(AddrKey, NatGatewayConfig, NatEntry, NatTraffic);
