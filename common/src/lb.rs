//! Load-balancer tables: frontends (VIP, port, protocol) to services, each service's Maglev
//! lookup table over its healthy backends, and the backends themselves.

use crate::pod;

/// Services (load-balancing and inbound NAT rules) one dataplane holds.
pub const MAX_SERVICES: u32 = 128;
/// Slots of a Maglev table (prime). Each service has two tables; the frontend names the live
/// one, so a rebuilt table is written beside the old and swapped in whole.
pub const MAGLEV_SIZE: u32 = 16_381;
pub const MAX_BACKENDS: u32 = 4_096;
pub const MAX_FRONTENDS: u32 = 8_192;
pub const NO_BACKEND: u32 = u32::MAX;

/// A frontend: address, port and protocol of the packet as it arrives. HA-ports frontends
/// have port 0 and protocol 0 and match every port and protocol of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Row of the Maglev tables and of the service counters.
    pub id: u32,
    /// The backend of an inbound NAT mapping, or `NO_BACKEND` to use the Maglev table.
    pub backend: u32,
    /// Destination port at the backend; 0 keeps the frontend port (HA ports).
    pub backend_port: u16,
    /// `DIST_*` in the low bits, `SVC_*` flags above.
    pub flags: u8,
    /// Which of the service's two Maglev tables is live (0 or 1).
    pub table: u8,
    /// Idle timeout of the rule's flows in seconds; 0: the policy's timeout for the protocol.
    pub idle_timeout_s: u32,
}

/// The hash a new flow's Maglev slot is taken from (modulo [`MAGLEV_SIZE`]): Murmur3-style
/// mixing of the fields distribution mode `dist` names, the 5-tuple, the two addresses, or
/// the addresses and the protocol. Addresses as the keys hold them, ports in host order.
/// The dataplane's, and the views' that name the backend a flow goes to.
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], dst: &[u32; 4], proto: u8, ports: (u16, u16), dist: u8) -> u32 {
    let mut h = 0x9747_b28c_u32;
    // Indexed, not iterator-chained: the verifier must see every access in bounds.
    for i in 0..4 {
        h = mix(h, src[i]);
        h = mix(h, dst[i]);
    }
    if dist != DIST_SOURCE_IP {
        h = mix(h, u32::from(proto));
    }
    if dist != DIST_SOURCE_IP && dist != DIST_SOURCE_IP_PROTOCOL {
        h = mix(h, (u32::from(ports.0) << 16) | u32::from(ports.1));
    }
    fmix(h)
}

#[inline(always)]
fn mix(h: u32, v: u32) -> u32 {
    let k = v.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// Murmur3's finalizer: every input bit moves about half the output bits.
#[inline(always)]
pub fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

pub const DIST_FIVE_TUPLE: u8 = 0;
pub const DIST_SOURCE_IP: u8 = 1;
pub const DIST_SOURCE_IP_PROTOCOL: u8 = 2;
pub const DIST_MASK: u8 = 3;
/// Direct server return: the destination stays the frontend address.
pub const SVC_FLOATING_IP: u8 = 4;
/// No backend can take new flows (all unhealthy and "no new flows" configured).
pub const SVC_NO_BACKEND: u8 = 8;
/// Mid-stream pickup for this rule's frontend (see `nsg::FLAG_MIDSTREAM`).
pub const SVC_MIDSTREAM: u8 = 16;
/// Encapsulated to the backend (`flow::NAT_ENCAP`); with `SVC_FLOATING_IP`, as the inner
/// packet keeps the frontend address.
pub const SVC_ENCAP: u8 = 32;
/// A frontend address's own entry ([`ADDRESS_PROTO`]): no rule serves a packet that no
/// (address, protocol, port) entry took (`DropReason::NoLbRule`).
pub const SVC_NO_RULE: u8 = 64;
/// A frontend address's own entry: its HA-ports rule, at (port 0, protocol 0), serves every
/// packet that no other entry took.
pub const SVC_HA_PORTS: u8 = 128;
/// The protocol of a frontend address's own entry (port 0), which says what serves a packet
/// no (address, protocol, port) entry took (`SVC_HA_PORTS`, `SVC_NO_RULE`): an address
/// without one is no frontend's. IANA's reserved protocol: no packet carries it, so programs
/// from before these entries, which look up (port 0, protocol 0) only, never meet one.
pub const ADDRESS_PROTO: u8 = 255;

/// Index of a Maglev slot in the `MAGLEV` array.
#[inline(always)]
pub const fn maglev_index(service: u32, table: u32, slot: u32) -> u32 {
    (service * 2 + table) * MAGLEV_SIZE + slot
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: [u32; 4],
    pub family: u8,
    /// 1 while the health probe says so; established non-TCP flows move off an unhealthy
    /// backend, TCP flows stay until they end.
    pub healthy: u8,
    pub _pad: [u8; 2],
}

pod!(FrontendKey, Service, BackendInfo);
