//! What a flow does with its packets beyond passing them: a type shared by the maps, the
//! flow table and the stages, kept apart from their logic so that no module imports one
//! above it.

use xdpgate_common::flow::{FlowValue, NAT_DST, NAT_ENCAP, NAT_NEXT_HOP, NAT_NONE, NAT_SRC};

/// A flow action that rewrites an ICMP error about a translated flow's packet back to that
/// flow's host (the entry it belongs to rewrites the destination: the error comes in from
/// the translated side).
pub const NAT_ICMP_ERROR_DST: u8 = 4;

/// The same for an error from the flow's host or its side (the entry rewrites the source:
/// the error goes out to the translated side, from the translated address).
pub const NAT_ICMP_ERROR_SRC: u8 = 10;

/// A new flow that still needs its SNAT port claimed (`port` holds the gateway index).
pub const NAT_PENDING_SNAT: u8 = 5;

/// Not a rewrite: the stage before asks the new-flow stage to classify the packet's flow
/// again (it was decided under an older policy).
pub const RECLASSIFY: Action = Action { nat: 6, addr: [0; 4], port: 0 };

/// Not a rewrite: the new-flow stage has just classified the packet's flow again (at
/// `RECLASSIFY`, or finding its embryonic flow stale), so the policy stage takes the flow
/// as it stands.
pub const JUDGED: Action = Action { nat: 9, addr: [0; 4], port: 0 };

// A request is told from a rewrite by its `nat` alone.
const _: () = {
    let requests = [
        NAT_ICMP_ERROR_DST,
        NAT_ICMP_ERROR_SRC,
        NAT_PENDING_SNAT,
        RECLASSIFY.nat,
        NOT_ESTABLISHED.nat,
        JUDGED.nat,
        TO_STACK.nat,
    ];
    let rewrites = [NAT_NONE, NAT_DST, NAT_SRC, NAT_NEXT_HOP, NAT_ENCAP];
    let mut i = 0;
    while i < requests.len() {
        let mut j = 0;
        while j < rewrites.len() {
            assert!(requests[i] != rewrites[j], "a request's code is a rewrite's");
            j += 1;
        }
        j = i + 1;
        while j < requests.len() {
            assert!(requests[i] != requests[j], "two requests share a code");
            j += 1;
        }
        i += 1;
    }
};

/// Not a rewrite: the packet goes to the stack as it is, and nothing of it is remembered,
/// not even a first fragment's verdict (whose later fragments would pass as it did): a new
/// flow's packet that a NAT gateway would translate but whose TTL runs out here. Returned
/// by `flow::create` only, never left for another stage; checked above with the requests
/// so that no code is shared.
pub const TO_STACK: Action = Action { nat: 11, addr: [0; 4], port: 0 };

/// Not a rewrite: the entry stage found the packet's flow in no established entry (it looks
/// there itself), so the new-flow stage looks among the embryonic flows before it makes one.
pub const NOT_ESTABLISHED: Action = Action { nat: 7, addr: [0; 4], port: 0 };

/// What the dataplane does with an allowed packet beyond passing it: the header rewrite
/// of its flow direction (`NAT_*`) and, for load-balanced flows, where it goes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Action {
    pub nat: u8,
    pub addr: [u32; 4],
    pub port: u16,
}

impl Action {
    /// Passes the packet as it is.
    pub const PASS: Action = Action { nat: NAT_NONE, addr: [0; 4], port: 0 };

    #[inline(always)]
    pub fn of(entry: &FlowValue) -> Self {
        Action { nat: entry.nat, addr: entry.nat_addr, port: entry.nat_port }
    }
}
