//! Upgrading the dataplane in place: `xdpgate upgrade` swaps the programs on the attached
//! interfaces for a newly loaded build while a TCP connection runs through the gateway. The
//! program ids change, and the connection carries on: its flow entries (which the next
//! segment needs, as only a SYN may start a flow) and the counters are the pinned maps,
//! untouched.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::{echo::EchoServer, gateway::Gateway};

const POLICY: &str = r#"
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: web
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-echo, priority: 100, direction: inbound, access: allow, protocol: tcp,
         source: Internet, destination: "*", destination_ports: 7}
"#;

fn prog_ids(lab: &Gateway) -> Vec<String> {
    [&lab.ext, &lab.int]
        .iter()
        .map(|i| {
            let out =
                String::from_utf8_lossy(&lab.gw.exec("ip", &["-d", "link", "show", i]).stdout)
                    .into_owned();
            out.split("prog/xdp id ")
                .nth(1)
                .expect("attached")
                .split(' ')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn upgrade_in_place_keeps_running_connections() {
    let lab = Gateway::new();
    lab.apply("policy.yaml", POLICY);
    let (client, server, pins) = (&lab.client, &lab.server, &lab.pins);

    let listener = server.run(|| TcpListener::bind("198.51.100.10:7").unwrap());
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut conn = client.run(|| {
        let s = TcpStream::connect("198.51.100.10:7").expect("connect through the gateway");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let echo = |conn: &mut TcpStream, msg: &[u8]| -> bool {
        let mut buf = vec![0u8; msg.len()];
        conn.write_all(msg).is_ok() && conn.read_exact(&mut buf).is_ok() && buf == msg
    };
    assert!(echo(&mut conn, b"before the upgrade"));
    let before = prog_ids(&lab);
    let stats_before: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["stats", "--json"])).unwrap();

    let out = pins.xdpgate(&["upgrade"]);
    assert!(
        out.contains(&format!("upgraded {}", lab.ext))
            && out.contains(&format!("upgraded {}", lab.int)),
        "{out}"
    );
    let after = prog_ids(&lab);
    assert!(
        before.iter().zip(&after).all(|(b, a)| b != a),
        "programs replaced: {before:?} -> {after:?}"
    );

    for i in 0..20 {
        assert!(
            echo(&mut conn, format!("after the upgrade {i}").as_bytes()),
            "the connection carries on"
        );
    }
    // Counters carried over (the pinned maps), and the flow was not classified again.
    let stats: serde_json::Value =
        serde_json::from_str(&pins.xdpgate(&["stats", "--json"])).unwrap();
    let flows = |s: &serde_json::Value| {
        s["policy"]["rules"].as_array().unwrap().iter().find(|r| r["rule"] == "allow-echo").unwrap()
            ["flows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(flows(&stats), flows(&stats_before), "still one flow: {stats}");
    assert_eq!(flows(&stats), 1);
}

/// Maps pinned with another layout (as an older build might have left them) are refused
/// with an error that names them, and the running dataplane carries on untouched.
#[test]
fn upgrade_refuses_maps_pinned_with_another_layout() {
    let lab = Gateway::new();
    lab.apply("policy.yaml", POLICY);
    let _echo = EchoServer::start(&lab.server, vec!["198.51.100.10:7".parse().unwrap()]);
    let pin = lab.pins.dir.path().join("FRAGS");
    std::fs::remove_file(&pin).unwrap();
    let pin = pin.to_str().unwrap();
    let old = ["type", "lru_hash", "key", "40", "value", "4", "entries", "16", "name", "FRAGS"];
    common::run("bpftool", &[&["map", "create", pin][..], &old].concat());
    let before = prog_ids(&lab);

    let out = lab.pins.try_xdpgate(&["upgrade"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(
        err.contains("incompatible build")
            && err.contains(
                "FRAGS: key 40 B, value 4 B, 16 entries pinned; this build needs 40 B, 20 B"
            ),
        "{err}"
    );
    assert_eq!(prog_ids(&lab), before, "the programs stay");
    let echoed = lab.client.run(|| {
        let mut s = TcpStream::connect("198.51.100.10:7").ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"still here").ok()?;
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).ok()?;
        Some(buf)
    });
    assert_eq!(echoed.as_ref().map(|b| &b[..]), Some(&b"still here"[..]), "traffic flows");
}
