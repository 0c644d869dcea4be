//! The kernel's FIB asked as the dataplane asks it: `bpf_fib_lookup` from an XDP program
//! (the `xdpgate-fib` object, run with `BPF_PROG_TEST_RUN`), so that `xdpgate next-hop`
//! gets the answer the forwarding stage gets, and the neighbour table (netlink) for the
//! state behind a missing neighbour.

use std::{
    ffi::CStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::rtnetlink;

/// The FIB probe (built by `build.rs` from `ebpf/src/fib.rs`).
static FIB_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpgate-fib"));

/// `sizeof(struct bpf_fib_lookup)`.
const PARAMS_LEN: usize = 64;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One flow as the forwarding stage asks about it.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// The interface the packet arrives by (the FIB checks forwarding on it and uses it
    /// for policy routing).
    pub ifindex: u32,
}

/// `BPF_FIB_LKUP_RET_*`: what the FIB said.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A route and a resolved neighbour: the dataplane can send it itself.
    Success,
    /// The route is a blackhole.
    Blackhole,
    /// The route is unreachable.
    Unreachable,
    /// The route is prohibited.
    Prohibit,
    /// No route, or the destination is local (delivered to this host).
    NotForwarded,
    /// Forwarding is disabled on the arrival interface.
    ForwardingDisabled,
    /// The route needs a lightweight tunnel.
    UnsupportedLwt,
    /// A route, but no valid neighbour entry for the next hop (yet).
    NoNeighbour,
    /// Longer than the route's MTU (never asked here: the length given is 0).
    FragmentationNeeded,
    /// No source address for the route.
    NoSourceAddress,
    /// Another code from a newer kernel.
    Other(i64),
}

impl Outcome {
    fn from_code(rc: i64) -> Self {
        match rc {
            0 => Self::Success,
            1 => Self::Blackhole,
            2 => Self::Unreachable,
            3 => Self::Prohibit,
            4 => Self::NotForwarded,
            5 => Self::ForwardingDisabled,
            6 => Self::UnsupportedLwt,
            7 => Self::NoNeighbour,
            8 => Self::FragmentationNeeded,
            9 => Self::NoSourceAddress,
            n => Self::Other(n),
        }
    }

    /// Whether the FIB named an egress interface and next hop.
    pub fn routed(self) -> bool {
        matches!(self, Self::Success | Self::NoNeighbour)
    }
}

/// The FIB's answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub outcome: Outcome,
    /// Egress interface (when routed).
    pub ifindex: Option<u32>,
    /// The address whose neighbour entry the packet needs: the gateway, or the
    /// destination itself on a connected route.
    pub neighbour: Option<IpAddr>,
    /// Whether the route has a gateway.
    pub via_gateway: bool,
    /// The MACs the dataplane would write (on success).
    pub smac: Option<[u8; 6]>,
    pub dmac: Option<[u8; 6]>,
    /// The route's MTU (on success).
    pub mtu: Option<u16>,
}

fn encode(q: &Query) -> Result<Vec<u8>> {
    let mut p = vec![0u8; PARAMS_LEN + 8];
    p[1] = q.proto;
    p[2..4].copy_from_slice(&q.sport.to_be_bytes());
    p[4..6].copy_from_slice(&q.dport.to_be_bytes());
    p[8..12].copy_from_slice(&q.ifindex.to_ne_bytes());
    match (q.src, q.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p[0] = AF_INET;
            p[16..20].copy_from_slice(&s.octets());
            p[32..36].copy_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p[0] = AF_INET6;
            p[16..32].copy_from_slice(&s.octets());
            p[32..48].copy_from_slice(&d.octets());
        }
        _ => bail!("source {} and destination {} are of different families", q.src, q.dst),
    }
    Ok(p)
}

fn decode(q: &Query, p: &[u8]) -> Result<Answer> {
    if p.len() < PARAMS_LEN + 8 {
        bail!("the FIB probe returned {} bytes, not {}", p.len(), PARAMS_LEN + 8);
    }
    let outcome = Outcome::from_code(i64::from_ne_bytes(p[64..72].try_into()?));
    let routed = outcome.routed();
    // An IPv4 route may have an IPv6 gateway: the family says which the helper wrote.
    let neighbour = match p[0] {
        AF_INET => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&p[32..36])?)),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[32..48])?)),
    };
    let mac = |r: std::ops::Range<usize>| -> Option<[u8; 6]> {
        (outcome == Outcome::Success).then(|| p[r].try_into().expect("six bytes"))
    };
    Ok(Answer {
        outcome,
        ifindex: routed.then(|| u32::from_ne_bytes(p[8..12].try_into().expect("four bytes"))),
        neighbour: routed.then_some(neighbour),
        via_gateway: routed && neighbour != q.dst,
        smac: mac(52..58),
        dmac: mac(58..64),
        mtu: (outcome == Outcome::Success).then(|| u16::from_ne_bytes([p[6], p[7]])),
    })
}

/// Asks the FIB of the current network namespace about `q`, as the dataplane's forwarding
/// stage does (`bpf_fib_lookup` from XDP, no flags). Loads a small program each time; it
/// creates no maps and leaves nothing behind.
pub fn lookup(q: &Query) -> Result<Answer> {
    let data = encode(q)?;
    let mut ebpf = EbpfLoader::new().load(FIB_OBJ).context("loading the FIB probe")?;
    let prog: &mut Xdp = ebpf
        .program_mut("xdpgate_fib")
        .ok_or_else(|| anyhow!("program xdpgate_fib missing from the FIB probe"))?
        .try_into()?;
    prog.load().context("loading the FIB probe program")?;
    let mut out = vec![0u8; data.len()];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(&data),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .map_err(|e: ProgramError| anyhow!(e))
        .context("running the FIB probe (BPF_PROG_TEST_RUN)")?;
    if res.return_value != 2 {
        bail!("the FIB probe refused its input (XDP verdict {})", res.return_value);
    }
    out.truncate(res.data_size_out as usize);
    decode(q, &out)
}

/// An interface's name by index in the current network namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// An interface's index by name in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("no interface named {name:?}"))
}

/// An interface's MTU (`SIOCGIFMTU`).
pub fn link_mtu(name: &str) -> Result<u32> {
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .context("opening a socket to read an MTU")?;
    // SAFETY: an all-zero ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {name:?} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("reading {name}'s MTU"));
    }
    // SAFETY: the kernel wrote the MTU member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// A neighbour table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub state: NeighbourState,
    pub mac: Option<[u8; 6]>,
}

/// `NUD_*`, the strongest bit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NeighbourState {
    Incomplete,
    Reachable,
    Stale,
    Delay,
    Probe,
    Failed,
    Noarp,
    Permanent,
    None,
}

impl NeighbourState {
    fn from_nud(s: u16) -> Self {
        const STATES: [(u16, NeighbourState); 8] = [
            (0x80, NeighbourState::Permanent),
            (0x40, NeighbourState::Noarp),
            (0x02, NeighbourState::Reachable),
            (0x04, NeighbourState::Stale),
            (0x08, NeighbourState::Delay),
            (0x10, NeighbourState::Probe),
            (0x20, NeighbourState::Failed),
            (0x01, NeighbourState::Incomplete),
        ];
        STATES.iter().find(|(bit, _)| s & bit != 0).map_or(Self::None, |(_, st)| *st)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Incomplete => "incomplete",
            Self::Reachable => "reachable",
            Self::Stale => "stale",
            Self::Delay => "delay",
            Self::Probe => "probe",
            Self::Failed => "failed",
            Self::Noarp => "noarp",
            Self::Permanent => "permanent",
            Self::None => "none",
        }
    }
}

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;

/// The neighbour entry for `addr` on interface `ifindex`, if the kernel has one (a dump of
/// the neighbour table over rtnetlink, in the current network namespace).
pub fn neighbour(ifindex: u32, addr: IpAddr) -> Result<Option<Neighbour>> {
    let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
    // ndmsg (12 bytes), asking for one family's entries.
    let mut req = rtnetlink::header(RTM_GETNEIGH, rtnetlink::NLM_F_REQUEST | rtnetlink::NLM_F_DUMP);
    req.extend_from_slice(&[family, 0, 0, 0]);
    req.extend_from_slice(&[0; 8]);
    let mut found = None;
    rtnetlink::request(req, "reading the neighbour table", |kind, body| {
        if kind == RTM_NEWNEIGH && found.is_none() {
            found = parse_neighbour(body, ifindex, addr);
        }
    })?;
    Ok(found)
}

/// Makes the kernel resolve the neighbour entry of `addr` on interface `ifindex` (as `ip
/// neigh replace ADDR dev DEV use` does: `NTF_USE` creates the entry if need be and sends a
/// solicitation, as a packet the stack sends there would), in the current network namespace.
pub fn resolve(ifindex: u32, addr: IpAddr) -> Result<()> {
    const NLM_F_REPLACE: u16 = 0x100;
    const NLM_F_CREATE: u16 = 0x400;
    const NTF_USE: u8 = 0x01;
    let (family, bytes) = match addr {
        IpAddr::V4(a) => (AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (AF_INET6, a.octets().to_vec()),
    };
    let flags = rtnetlink::NLM_F_REQUEST | rtnetlink::NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    let mut req = rtnetlink::header(RTM_NEWNEIGH, flags);
    // ndmsg: family, padding, ifindex, state (none: NTF_USE leaves it to the resolution),
    // flags, type.
    req.extend_from_slice(&[family, 0, 0, 0]);
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&[NTF_USE, 0]);
    rtnetlink::attr(&mut req, NDA_DST, &bytes);
    rtnetlink::request(req, "resolving a neighbour", |_, _| {})
        .with_context(|| format!("resolving the neighbour {addr} on ifindex {ifindex}"))
}

/// One `RTM_NEWNEIGH` body, when it is `addr` on `ifindex`.
fn parse_neighbour(body: &[u8], ifindex: u32, addr: IpAddr) -> Option<Neighbour> {
    let nd_ifindex = i32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
    let state = u16::from_ne_bytes(body.get(8..10)?.try_into().ok()?);
    if nd_ifindex as u32 != ifindex {
        return None;
    }
    let (mut dst, mut mac) = (None, None);
    for (kind, value) in rtnetlink::attributes(body, 12) {
        match (kind, value.len()) {
            (NDA_DST, 4) => dst = Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
            (NDA_DST, 16) => dst = Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
            (NDA_LLADDR, 6) => mac = Some(value.try_into().ok()?),
            _ => {}
        }
    }
    (dst == Some(addr)).then_some(Neighbour { state: NeighbourState::from_nud(state), mac })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
