//! The generated frames: Ethernet, IPv4 or IPv6, and a UDP datagram or a TCP SYN, with
//! correct lengths and checksums, one template per flow.

use std::{net::IpAddr, str::FromStr};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// The largest frame: live frames must fit one page with the kernel's head- and tailroom.
pub const MAX_FRAME: usize = 3_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Udp,
    Tcp,
}

pub type Mac = [u8; 6];

/// A range of addresses, FIRST-LAST inclusive, of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl AddrRange {
    fn len(&self) -> u128 {
        (bits(self.last) - bits(self.first)).saturating_add(1)
    }

    fn nth(&self, i: u128) -> IpAddr {
        let b = bits(self.first) + i;
        match self.first {
            IpAddr::V4(_) => IpAddr::V4((b as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(b.into()),
        }
    }
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a).into(),
        IpAddr::V6(a) => a.into(),
    }
}

impl FromStr for AddrRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: IpAddr = a.trim().parse().with_context(|| format!("{a:?} is not an address"))?;
        let last: IpAddr = b.trim().parse().with_context(|| format!("{b:?} is not an address"))?;
        if first.is_ipv4() != last.is_ipv4() || bits(last) < bits(first) {
            bail!("{s:?}: a range is FIRST-LAST of one family, FIRST not above LAST");
        }
        Ok(Self { first, last })
    }
}

/// A range of ports, FIRST-LAST inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().with_context(|| format!("{a:?} is not a port"))?;
        let last: u16 = b.trim().parse().with_context(|| format!("{b:?} is not a port"))?;
        if last < first {
            bail!("{s:?}: FIRST-LAST with FIRST not above LAST");
        }
        Ok(Self { first, last })
    }
}

/// Everything the generated frames share, and what varies between them.
#[derive(Debug, Clone)]
pub struct FrameSpec {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: AddrRange,
    pub dst: IpAddr,
    pub sport: PortRange,
    pub dport: u16,
    pub proto: Proto,
    /// Frame length without the FCS.
    pub size: usize,
}

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const TCP_LEN: usize = 20;

impl FrameSpec {
    /// Length of the headers: the smallest frame.
    pub fn headers_len(&self) -> usize {
        ETH_LEN
            + if self.dst.is_ipv4() { IPV4_LEN } else { IPV6_LEN }
            + match self.proto {
                Proto::Udp => UDP_LEN,
                Proto::Tcp => TCP_LEN,
            }
    }

    /// `n` distinct frames (fewer if the ranges hold fewer combinations): template `i`
    /// takes the `i`-th combination of source port (varying fastest) and source address.
    pub fn templates(&self, n: u32) -> Result<Vec<Vec<u8>>> {
        if self.src.first.is_ipv4() != self.dst.is_ipv4() {
            bail!("--src and --dst must be of the same address family");
        }
        if self.size < self.headers_len() || self.size > MAX_FRAME {
            bail!(
                "--size must be {}-{MAX_FRAME} bytes for {:?} over {}",
                self.headers_len(),
                self.proto,
                if self.dst.is_ipv4() { "IPv4" } else { "IPv6" }
            );
        }
        let ports = u128::from(self.sport.last - self.sport.first) + 1;
        let combos = ports.saturating_mul(self.src.len());
        let n = u128::from(n).min(combos);
        Ok((0..n)
            .map(|i| {
                let sport = self.sport.first + (i % ports) as u16;
                let src = self.src.nth((i / ports) % self.src.len());
                self.frame(src, sport, i as u32)
            })
            .collect())
    }

    /// One frame from `src`:`sport`, with correct lengths and checksums. UDP payloads fill
    /// the frame to `size`; TCP SYNs carry no payload and are padded like Ethernet pads.
    pub fn frame(&self, src: IpAddr, sport: u16, seq: u32) -> Vec<u8> {
        let l4_hdr = match self.proto {
            Proto::Udp => UDP_LEN,
            Proto::Tcp => TCP_LEN,
        };
        let l4_len = match self.proto {
            Proto::Udp => self.size - self.headers_len() + UDP_LEN,
            Proto::Tcp => TCP_LEN,
        };
        let mut l4 = vec![0u8; l4_len];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&self.dport.to_be_bytes());
        let proto_num = match self.proto {
            Proto::Udp => {
                l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                for (i, b) in l4[l4_hdr..].iter_mut().enumerate() {
                    *b = i as u8;
                }
                17u8
            }
            Proto::Tcp => {
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                l4[12] = (5 << 4) as u8; // data offset: 5 words
                l4[13] = 0x02; // SYN
                l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
                6u8
            }
        };
        let csum_at = match self.proto {
            Proto::Udp => 6,
            Proto::Tcp => 16,
        };

        let mut frame = Vec::with_capacity(self.size);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = [0u8; IPV4_LEN];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&((IPV4_LEN + l4_len) as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
                ip[6] = 0x40; // don't fragment
                ip[8] = 64;
                ip[9] = proto_num;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let c = checksum(&[&ip]);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                let pseudo = [
                    &s.octets()[..],
                    &d.octets()[..],
                    &[0, proto_num],
                    &(l4_len as u16).to_be_bytes(),
                ];
                let mut c = checksum(&[pseudo[0], pseudo[1], pseudo[2], pseudo[3], &l4]);
                if c == 0 && self.proto == Proto::Udp {
                    c = 0xffff;
                }
                l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut ip = [0u8; IPV6_LEN];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                ip[6] = proto_num;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                let len = (l4_len as u32).to_be_bytes();
                let mut c = checksum(&[&s.octets(), &d.octets(), &len, &[0, 0, 0, proto_num], &l4]);
                if c == 0 && self.proto == Proto::Udp {
                    c = 0xffff;
                }
                l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            _ => unreachable!("families checked in templates()"),
        }
        frame.extend_from_slice(&l4);
        frame.resize(self.size.max(frame.len()), 0);
        frame
    }
}

/// The Internet checksum of the concatenation of `parts` (each of even length but the
/// last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    fn spec(src: &str, dst: &str, proto: Proto, size: usize) -> FrameSpec {
        FrameSpec {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: "1000-1003".parse().unwrap(),
            dport: 9,
            proto,
            size,
        }
    }

    /// Every template parses, has the right length and ports, and valid checksums
    /// (verified by etherparse, not by our own checksum code).
    #[test]
    fn frames_are_well_formed_with_valid_checksums() {
        for (src, dst) in [
            ("203.0.113.1-203.0.113.3", "198.51.100.1"),
            ("2001:db8::1-2001:db8::3", "2001:db8:1::1"),
        ] {
            for proto in [Proto::Udp, Proto::Tcp] {
                for size in [60, 61, 128, 1514] {
                    let s =
                        spec(src, dst, proto, size.max(spec(src, dst, proto, 60).headers_len()));
                    let frames = s.templates(10).unwrap();
                    assert_eq!(frames.len(), 10);
                    for (i, f) in frames.iter().enumerate() {
                        assert_eq!(f.len(), s.size);
                        let p = SlicedPacket::from_ethernet(f).unwrap();
                        let (src_ip, dst_ip, ip_payload_len): (IpAddr, IpAddr, usize) = match &p.net
                        {
                            Some(NetSlice::Ipv4(v4)) => {
                                let h = v4.header();
                                assert_eq!(
                                    h.to_header().calc_header_checksum(),
                                    h.header_checksum()
                                );
                                (
                                    h.source_addr().into(),
                                    h.destination_addr().into(),
                                    v4.payload().payload.len(),
                                )
                            }
                            Some(NetSlice::Ipv6(v6)) => {
                                let h = v6.header();
                                (
                                    h.source_addr().into(),
                                    h.destination_addr().into(),
                                    v6.payload().payload.len(),
                                )
                            }
                            other => panic!("not IP: {other:?}"),
                        };
                        assert_eq!(dst_ip, s.dst);
                        assert_eq!(
                            src_ip,
                            s.src.nth(i as u128 / 4),
                            "addresses vary after the 4 ports"
                        );
                        let ip_hdr = if s.dst.is_ipv4() { IPV4_LEN } else { IPV6_LEN };
                        assert!(ETH_LEN + ip_hdr + ip_payload_len <= f.len());
                        match p.transport {
                            Some(TransportSlice::Udp(u)) => {
                                assert_eq!(u.source_port(), 1000 + (i % 4) as u16);
                                assert_eq!(u.destination_port(), 9);
                                let expect = match (src_ip, dst_ip) {
                                    (IpAddr::V4(a), IpAddr::V4(b)) => u
                                        .to_header()
                                        .calc_checksum_ipv4_raw(a.octets(), b.octets(), u.payload())
                                        .unwrap(),
                                    (IpAddr::V6(a), IpAddr::V6(b)) => u
                                        .to_header()
                                        .calc_checksum_ipv6_raw(a.octets(), b.octets(), u.payload())
                                        .unwrap(),
                                    _ => unreachable!(),
                                };
                                assert_eq!(u.checksum(), expect, "UDP checksum");
                                assert_eq!(
                                    usize::from(u.length()),
                                    size.max(s.headers_len()) - s.headers_len() + UDP_LEN
                                );
                            }
                            Some(TransportSlice::Tcp(t)) => {
                                assert!(t.syn() && !t.ack());
                                assert_eq!(t.source_port(), 1000 + (i % 4) as u16);
                                let expect = match (src_ip, dst_ip) {
                                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                                        t.calc_checksum_ipv4(a.octets(), b.octets()).unwrap()
                                    }
                                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                                        t.calc_checksum_ipv6(a.octets(), b.octets()).unwrap()
                                    }
                                    _ => unreachable!(),
                                };
                                assert_eq!(t.checksum(), expect, "TCP checksum");
                            }
                            other => panic!("no transport: {other:?}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn templates_are_capped_by_the_combinations() {
        let s = spec("203.0.113.1-203.0.113.2", "198.51.100.1", Proto::Udp, 60);
        let frames = s.templates(1000).unwrap();
        assert_eq!(frames.len(), 8, "4 ports x 2 addresses");
        let mut sorted = frames.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "all distinct");
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(spec("203.0.113.1", "2001:db8::1", Proto::Udp, 80).templates(1).is_err());
        assert!(spec("203.0.113.1", "198.51.100.1", Proto::Tcp, 50).templates(1).is_err());
        assert!(
            spec("203.0.113.1", "198.51.100.1", Proto::Udp, MAX_FRAME + 1).templates(1).is_err()
        );
        assert!("203.0.113.9-203.0.113.1".parse::<AddrRange>().is_err());
        assert!("203.0.113.1-2001:db8::1".parse::<AddrRange>().is_err());
        assert!("2000-1000".parse::<PortRange>().is_err());
    }
}
