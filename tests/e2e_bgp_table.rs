//! The agent's BGP table read on its own (issue 16): the agent lists its table every second,
//! and a host with a full BGP table (900k routes in another table) must not pay for a dump
//! of all its routes each time. The kernel filters by table and protocol (strict checking);
//! what one listing reads is counted, not timed (the time is printed).

mod common;

use std::{net::IpAddr, time::Instant};

use common::Netns;
use xdpgate_dataplane::host_routes;

const TABLE: u32 = 4242;

#[test]
fn listing_the_announcement_table_reads_only_its_routes() {
    let ns = Netns::new("xgbt");
    // A BGP daemon's routes in another table (XDPGATE_LONG=1: a full table's 900,000).
    let many = if std::env::var_os("XDPGATE_LONG").is_some() { 900_000 } else { 20_000 };
    let batch: String = (0..many)
        .map(|i: u32| {
            let [_, a, b, c] = i.to_be_bytes();
            format!("route add blackhole 10.{a}.{b}.{c}/32 table 100 proto bgp\n")
        })
        .chain((0..1000).map(|i| format!("route add blackhole 2001:db8:ff::{i:x}/128 table 100\n")))
        .collect();
    let file = std::env::temp_dir().join(format!("{}.routes", ns.name));
    std::fs::write(&file, batch).unwrap();
    ns.exec("ip", &["-batch", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    // Another protocol's route in the agent's table is not the agent's.
    let table = TABLE.to_string();
    ns.exec("ip", &["route", "add", "blackhole", "192.0.2.99/32", "table", &table]);

    let ours: Vec<IpAddr> = vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()];
    let (listing, took, absent) = ns.run(move || {
        for addr in ours {
            host_routes::add(TABLE, addr).unwrap();
        }
        let start = Instant::now();
        let listing = host_routes::read(TABLE).unwrap();
        let took = start.elapsed();
        // A table the kernel does not have yet (no route ever added) lists empty.
        let absent = host_routes::read(TABLE + 1).unwrap();
        (listing, took, absent)
    });
    eprintln!(
        "one listing of table {TABLE} beside {many} other routes: {} route messages read, {:?}",
        listing.messages, took
    );
    let mut routes: Vec<String> = listing.routes.iter().map(IpAddr::to_string).collect();
    routes.sort();
    assert_eq!(routes, ["192.0.2.10", "2001:db8::10"]);
    assert_eq!(
        listing.messages, 2,
        "the kernel sent {} route messages for a table of 2 routes of ours",
        listing.messages
    );
    assert!(absent.routes.is_empty());
    assert_eq!(absent.messages, 0);
}
