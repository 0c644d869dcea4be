//! Load balancing of a flow's first packet: find the frontend, pick a backend from the
//! service's live Maglev table with the hash its distribution mode asks for.

use xdpgate_common::{
    lb::{
        ADDRESS_PROTO, BackendInfo, DIST_MASK, FrontendKey, MAGLEV_SIZE, NO_BACKEND, SVC_ENCAP,
        SVC_FLOATING_IP, SVC_HA_PORTS, SVC_MIDSTREAM, SVC_NO_BACKEND, SVC_NO_RULE, Service,
        flow_hash, maglev_index,
    },
    nsg::FLAG_FRONTEND_ADDRESSES,
};

use crate::{
    headers::{IPPROTO_TCP, IPPROTO_UDP},
    maps::{BACKENDS, FRONTENDS, MAGLEV},
    parse::PacketMeta,
};

pub struct Selection {
    pub service: u32,
    pub backend: u32,
    pub addr: [u32; 4],
    /// Destination port at the backend.
    pub port: u16,
    pub floating_ip: bool,
    /// Encapsulated to the backend (`NAT_ENCAP`; the inner packet as with floating IP).
    pub encap: bool,
    /// The rule's idle timeout in seconds (0: the policy's).
    pub idle_s: u16,
    /// The rule takes up TCP segments other than SYNs as new flows.
    pub midstream: bool,
}

pub enum Lb {
    /// The destination is no frontend: plain forwarding.
    NotFrontend,
    /// A frontend's address, on a port or protocol no rule serves.
    NoRule,
    /// A frontend without a backend for new flows.
    NoBackend,
    Selected(Selection),
}

/// The service of `meta`'s frontend, or its address's `SVC_NO_RULE` entry. `addresses`:
/// each frontend address has its own entry (`FLAG_FRONTEND_ADDRESSES`).
#[inline(always)]
fn frontend(meta: &PacketMeta, addresses: bool) -> Option<&'static Service> {
    // One key, rewritten for each lookup: the new-flow stage's stack is at its limit.
    let mut key =
        FrontendKey { addr: meta.dst, port: meta.dport, proto: meta.proto, family: meta.family };
    // Protocol 255 (no ports) has the key of the address's own entry, which is no service.
    if !(addresses && meta.proto == ADDRESS_PROTO)
        && let Some(s) = unsafe { FRONTENDS.get(&key) }
    {
        return Some(s);
    }
    // HA ports: every port and protocol of the address.
    key.port = 0;
    key.proto = 0;
    if !addresses {
        return unsafe { FRONTENDS.get(&key) };
    }
    key.proto = ADDRESS_PROTO;
    let address = unsafe { FRONTENDS.get(&key)? };
    if address.flags & SVC_HA_PORTS == 0 {
        return Some(address);
    }
    key.proto = 0;
    unsafe { FRONTENDS.get(&key) }
}

/// Whether `meta`'s destination is a frontend's address, as its own entry says (known only
/// with `FLAG_FRONTEND_ADDRESSES` in `flags`).
#[inline(always)]
pub fn frontend_address(meta: &PacketMeta, flags: u32) -> bool {
    let own = FrontendKey { addr: meta.dst, port: 0, proto: ADDRESS_PROTO, family: meta.family };
    flags & FLAG_FRONTEND_ADDRESSES != 0 && unsafe { FRONTENDS.get(&own) }.is_some()
}

/// The load balancer's choice for a new flow's first packet `meta`; `flags`, the running
/// policy's (`FLAG_FRONTEND_ADDRESSES`).
#[inline(always)]
pub fn select(meta: &PacketMeta, flags: u32) -> Lb {
    let Some(svc) = frontend(meta, flags & FLAG_FRONTEND_ADDRESSES != 0) else {
        return Lb::NotFrontend;
    };
    if svc.flags & SVC_NO_RULE != 0 {
        return Lb::NoRule;
    }
    let backend = if svc.backend != NO_BACKEND {
        svc.backend
    } else if svc.flags & SVC_NO_BACKEND != 0 {
        return Lb::NoBackend;
    } else {
        let slot = hash(meta, svc.flags & DIST_MASK) % MAGLEV_SIZE;
        match MAGLEV.get(maglev_index(svc.id, u32::from(svc.table & 1), slot)) {
            Some(b) => *b,
            None => return Lb::NoBackend,
        }
    };
    let Some(info): Option<&BackendInfo> = BACKENDS.get(backend) else { return Lb::NoBackend };
    if info.family != meta.family {
        return Lb::NoBackend;
    }
    let ported = meta.proto == IPPROTO_TCP || meta.proto == IPPROTO_UDP;
    let floating_ip = svc.flags & (SVC_FLOATING_IP | SVC_ENCAP) != 0;
    // With floating IP the packet reaches the backend unchanged, its port included.
    let port =
        if ported && svc.backend_port != 0 && !floating_ip { svc.backend_port } else { meta.dport };
    // Policy checks keep it within 4-7200 s.
    let idle_s = svc.idle_timeout_s as u16;
    let midstream = svc.flags & SVC_MIDSTREAM != 0;
    Lb::Selected(Selection {
        service: svc.id,
        backend,
        addr: info.addr,
        port,
        floating_ip,
        encap: svc.flags & SVC_ENCAP != 0,
        idle_s,
        midstream,
    })
}

/// The Maglev hash of `meta`'s flow ([`flow_hash`]).
#[inline(always)]
pub fn hash(meta: &PacketMeta, dist: u8) -> u32 {
    flow_hash(&meta.src, &meta.dst, meta.proto, (meta.sport, meta.dport), dist)
}
