//! The backend's decapsulation program (`xdpgate-decap`, `xdpgate decap attach`): its maps,
//! pinned apart from the gateway's under `<pin dir>/decap/`.

use crate::pod;

/// Subdirectory of the pin directory holding the decap program's maps and `links/<if>`.
pub const DECAP_DIR: &str = "decap";
/// The frontend addresses this backend serves: [`DecapKey`] -> 1. Only packets whose inner
/// destination is one of them are decapsulated.
pub const DECAP_FRONTENDS: &str = "DECAP_FRONTENDS";
pub const MAX_DECAP_FRONTENDS: u32 = 1_024;
/// The gateways' outer source addresses or prefixes: `LpmTrie<nat::AddrKey, u32>` (-> 1).
/// Only IP-in-IP from one of them is decapsulated.
pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
pub const MAX_DECAP_SOURCES: u32 = 256;
/// Packets per [`DecapCounter`], per CPU.
pub const DECAP_STATS: &str = "DECAP_STATS";

/// What the decap program did with a packet (index into `DECAP_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Stripped of its outer header and passed to the stack.
    Decapsulated = 0,
    /// A gateway's IP-in-IP not decapsulated: not for a frontend served here, an inner
    /// header cut short, or an outer IPv4 header with options or fragmented: passed
    /// untouched.
    Passed = 1,
    /// Not an IP-in-IP packet (no 4 or 41 after the outer header or its extension chain; a
    /// gateway's IPv6 with extension headers, either): passed untouched.
    NotTunnel = 2,
    /// IP-in-IP from an outer source that is no gateway's (`DECAP_SOURCES`), its inner
    /// header found behind outer IPv4 options or up to 4 IPv6 extension headers, in a
    /// first fragment too. Dropped when its inner destination is a frontend served here
    /// (another IP-in-IP receiver on the host would decapsulate it), when it carries a
    /// tunnel again (inner IPv6 followed by any extension header included), when its inner
    /// header or IPv6 extension chain is not whole within the outer datagram's length (the
    /// rest may follow in another fragment) or its headers are malformed, and, IP-in-IP or
    /// not, when its IPv6 extension chain is longer; else passed untouched, and so are
    /// later fragments (no inner header: their first one's decides). (A `DECAP_STATS` pinned by a build
    /// from before has no slot for it.)
    Untrusted = 3,
}
pub const DECAP_COUNTERS: u32 = 4;

/// A frontend address: IPv4 in the first word (the rest zero), or IPv6, as network-order
/// words (see [`crate::words`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecapKey {
    /// 4 or 6.
    pub family: u32,
    pub addr: [u32; 4],
}

pod!(DecapKey);
