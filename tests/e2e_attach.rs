//! End to end on real interfaces: two namespaces joined by veth, the dataplane attached in
//! native mode by the `xdpgate` binary, real TCP, UDP and ICMP echo sent across, counters
//! read back by a second invocation, then a clean detach.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use common::{Netns, Pins, veth};

fn rx_packets(ns: &Netns, ifname: &str) -> u64 {
    let out = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/statistics/rx_packets")]);
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("rx_packets")
}

fn pass_counter(pins: &Pins, ifname: &str) -> (u64, u64) {
    let json: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["stats", "--json"])).expect("stats json");
    let iface = json["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["interface"] == ifname)
        .unwrap_or_else(|| panic!("{ifname} missing from stats: {json}"));
    let pass = &iface["verdicts"]["pass"];
    (pass["packets"].as_u64().unwrap(), pass["bytes"].as_u64().unwrap())
}

#[test]
fn attach_counts_real_tcp_udp_icmp_then_detaches() {
    let client = Netns::new("xgc");
    let server = Netns::new("xgs");
    let (_ca, sb) = veth(
        &client,
        "198.51.100.1/24,2001:db8:1::1/64",
        &server,
        "198.51.100.2/24,2001:db8:1::2/64",
    );
    let pins = Pins::in_netns(&server);

    let out = pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &sb, "--role", "internal"]);
    assert!(out.contains("attached"), "{out}");
    let link = String::from_utf8_lossy(&server.exec("ip", &["-d", "link", "show", &sb]).stdout)
        .into_owned();
    assert!(link.contains("prog/xdp") && !link.contains("xdpgeneric"), "not native XDP: {link}");
    // A second attach to the same interface is refused, not stacked.
    assert!(!pins.try_xdpgate(&["attach", "--hook", "xdp", "--iface", &sb]).status.success());

    // Where both counts start: a pair no packet arrived in the middle of (the interface's
    // count the same before and after the dataplane's is read).
    let (rx_before, (pkts_before, bytes_before)) = loop {
        let rx = rx_packets(&server, &sb);
        let pass = pass_counter(&pins, &sb);
        if rx_packets(&server, &sb) == rx {
            break (rx, pass);
        }
    };

    // TCP: 64 KiB from client to a server in the other namespace, echoed length back.
    const TCP_BYTES: usize = 64 * 1024;
    let listener = server.run(|| TcpListener::bind("198.51.100.2:8080").expect("bind"));
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read");
        s.write_all(&(buf.len() as u64).to_be_bytes()).expect("reply");
    });
    let got = client.run(|| {
        let mut s = TcpStream::connect_timeout(
            &"198.51.100.2:8080".parse().unwrap(),
            Duration::from_secs(5),
        )
        .expect("connect through xdpgate");
        s.write_all(&vec![7u8; TCP_BYTES]).expect("send");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut len = [0u8; 8];
        s.read_exact(&mut len).expect("reply");
        u64::from_be_bytes(len)
    });
    srv.join().unwrap();
    assert_eq!(got, TCP_BYTES as u64, "server received every byte");

    // UDP over IPv6: 5 datagrams, each answered.
    let udp_srv = server.run(|| UdpSocket::bind("[2001:db8:1::2]:5353").expect("bind udp"));
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        for _ in 0..5 {
            let (n, from) = udp_srv.recv_from(&mut buf).expect("recv");
            udp_srv.send_to(&buf[..n], from).expect("send");
        }
    });
    let answered = client.run(|| {
        let s = UdpSocket::bind("[2001:db8:1::1]:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (0..5)
            .filter(|i| {
                s.send_to(&[*i as u8; 100], "[2001:db8:1::2]:5353").unwrap();
                let mut buf = [0u8; 200];
                matches!(s.recv_from(&mut buf), Ok((100, _)))
            })
            .count()
    });
    echo.join().unwrap();
    assert_eq!(answered, 5);

    // ICMP echo.
    let ping = client.try_exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", "198.51.100.2"]);
    assert!(ping.status.success(), "ping: {}", String::from_utf8_lossy(&ping.stdout));

    // The counters, read by a separate invocation from the pins, account for every packet
    // the server's interface received: XDP sees each one before the stack counts it.
    // A packet can arrive between the two reads (a neighbour probe, say): read both again
    // until they agree, or until it is clear they will not.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (counted, bytes, rx) = loop {
        let (pkts, bytes) = pass_counter(&pins, &sb);
        let rx = rx_packets(&server, &sb) - rx_before;
        let counted = pkts - pkts_before;
        if counted == rx || std::time::Instant::now() > deadline {
            break (counted, bytes, rx);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // At least: TCP handshake ACK + 64 KiB of segments + FIN, 5 UDP, 3 echo requests.
    assert!(counted >= 3 + 5 + 3, "counted only {counted} packets");
    assert!(
        bytes - bytes_before >= TCP_BYTES as u64 + 500,
        "counted only {} bytes",
        bytes - bytes_before
    );
    assert_eq!(counted, rx, "xdpgate counted {counted} packets, the interface received {rx}");

    // Detach: the program is gone from the interface and traffic still flows. From the
    // host's namespace, without --netns: the pin directory's link names the interface.
    let mut detach = std::process::Command::new(common::xdpgate_bin());
    detach.arg("--pin-dir").arg(pins.dir.path()).args(["detach", "--iface", &sb]);
    let out = detach.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("detached"), "{out}");
    let link = String::from_utf8_lossy(&server.exec("ip", &["-d", "link", "show", &sb]).stdout)
        .into_owned();
    assert!(!link.contains("prog/xdp"), "still attached: {link}");
    assert!(client.try_exec("ping", &["-c", "1", "-W", "2", "198.51.100.2"]).status.success());
    assert!(!pins.dir.link(&sb).exists(), "link pin left behind");

    // Another interface attached next takes the freed counter slot, not its counts (seen
    // failing: it started with every packet the detached one had).
    let (_ca2, sb2) = veth(&client, "198.51.101.1/24", &server, "198.51.101.2/24");
    pins.xdpgate(&["attach", "--hook", "xdp", "--iface", &sb2, "--role", "internal"]);
    let (fresh, _) = pass_counter(&pins, &sb2);
    assert!(fresh < counted, "{sb2} starts with {fresh} packets; {sb} had {counted}");
}
