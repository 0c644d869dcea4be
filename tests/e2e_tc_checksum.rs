//! The tc pipeline's NAT on CHECKSUM_PARTIAL socket buffers, where a wrong checksum shows:
//! a host's TCP segments cross a veth with checksum offload (and TSO), so the gateway's tc
//! program sees them CHECKSUM_PARTIAL, the TCP checksum field holding only the
//! pseudo-header's sum; the gateway's own interfaces have transmit checksumming off, so
//! the kernel completes the checksum in software from that field (as a NIC would in
//! hardware) and the receiver checks it. A translation that updated the field as if it
//! held a full checksum (the XDP rewrite) leaves every segment with a bad checksum, which
//! the receiver drops: the transfer stalls. (Between veths that keep checksum offload the
//! receiver trusts CHECKSUM_PARTIAL and never checks, so e2e_tc cannot tell.)
//!
//!   server 198.51.100.10 --(TSO)-- int [gw, tx csum off] ext -- client 203.0.113.10
//!   NAT gateway: 198.51.100.0/24 leaves as 192.0.2.100

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::gateway::{CLIENT4, Gateway};

const NAT_POLICY: &str = r#"virtual_network:
  address_space: [198.51.100.0/24]
nat_gateways:
  - name: natgw
    public_addresses: [192.0.2.100]
    subnets: [198.51.100.0/24]
"#;

/// A stalled transfer fails the test within this, rather than hanging it.
const IO_WAIT: Duration = Duration::from_secs(10);
const LEN: usize = 4 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn snat_of_partial_checksum_segments_is_checksummed_right() {
    let net = Gateway::tc();
    for iface in [&net.ext, &net.int] {
        // Transmit checksumming off (TSO and GSO's offload go with it): the kernel
        // checksums what leaves from the seed in the TCP checksum field.
        net.gw.exec("ethtool", &["-K", iface, "tx", "off"]);
    }
    net.apply("nat.yaml", NAT_POLICY);

    // The "internet" client echoes what the protected server uploads.
    let addr: SocketAddr = format!("{CLIENT4}:8080").parse().unwrap();
    let listener = net.client.run(move || TcpListener::bind(addr).unwrap());
    let echo = thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(IO_WAIT)).unwrap();
        conn.set_write_timeout(Some(IO_WAIT)).unwrap();
        let mut got = vec![0u8; LEN];
        let read = conn.read_exact(&mut got);
        if read.is_ok() {
            let _ = conn.write_all(&got);
        }
        let _ = conn.shutdown(Shutdown::Write);
        (peer, read.map(|_| got))
    });

    let back = net.server.run(move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(IO_WAIT))?;
        s.set_write_timeout(Some(IO_WAIT))?;
        let mut reader = s.try_clone()?;
        let read = thread::spawn(move || {
            let mut back = Vec::new();
            reader.read_to_end(&mut back).map(|_| back)
        });
        s.write_all(&pattern(LEN, 1))?;
        read.join().expect("reader")
    });
    // The server's side first: it gives up within its timeouts (the client's may still wait
    // for a connection that never came).
    let back = back.unwrap_or_else(|e| panic!("transfer through SNAT stalled: {e}"));
    let (peer, uploaded) = echo.join().expect("echo");
    let uploaded = uploaded.unwrap_or_else(|e| panic!("upload through SNAT stalled: {e}"));
    assert!(uploaded == pattern(LEN, 1), "the upload arrived changed");
    assert_eq!(peer.ip().to_string(), "192.0.2.100", "the client saw the pool address");
    assert_eq!(back.len(), LEN, "{} of {LEN} bytes came back", back.len());
    assert!(back == pattern(LEN, 1), "the download arrived changed");

    // Both directions were forwarded by the tc programs themselves (a redirect from the
    // cached next hop), not handed to the stack: it is their rewrite that was checked.
    let stats: serde_json::Value =
        serde_json::from_str(&net.pins.xdpgate(&["stats", "--json"])).unwrap();
    for iface in [&net.int, &net.ext] {
        let entry = stats["interfaces"]
            .as_array()
            .and_then(|all| all.iter().find(|i| i["interface"] == iface.as_str()))
            .unwrap_or_else(|| panic!("{iface} missing: {stats}"));
        let redirected = entry["verdicts"]["redirect"]["packets"].as_u64().unwrap_or(0);
        assert!(redirected > 10, "{redirected} packets redirected from {iface}: {entry}");
    }
}
