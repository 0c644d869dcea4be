//! BIRD 2's configuration for a node, from its node file's `bgp:` section
//! (`xdpgate bgp bird-config --node FILE`): BIRD learns the agent's table with its `kernel`
//! protocol and exports exactly those routes to the peers. The agent needs no daemon API:
//! the kernel table is the interface, so FRR (`redistribute table N`) works the same way.

use std::{fmt::Write as _, net::IpAddr};

use xdpgate_dataplane::host_routes;

use crate::node::bgp::Bgp;

/// The `bird.conf` of a node with values `bgp`.
pub fn config(bgp: &Bgp) -> String {
    let table = bgp.table;
    let mut out = format!(
        "# BIRD 2 configuration written by `xdpgate bgp bird-config` from the node file's bgp:\n\
         # section. The agent keeps one host route per frontend it announces in kernel table\n\
         # {table} (`ip route show table {table}`); BIRD learns it and announces it to the peers.\n\
         router id {};\n\n\
         # Interfaces: BIRD needs them to read routes through `lo`.\n\
         protocol device {{\n}}\n\n",
        bgp.router_id
    );
    for (family, host) in [("ipv4", 32), ("ipv6", 128)] {
        let _ = write!(
            out,
            "# The agent's routes, learned (`learn`: they are not BIRD's own); BIRD writes nothing.\n\
             # Only its host routes (protocol {proto}): nothing else put in the table is announced.\n\
             protocol kernel xdpgate_{family} {{\n\
             \x20 kernel table {table};\n\
             \x20 learn;\n\
             \x20 scan time 10;\n\
             \x20 {family} {{ import where krt_source = {proto} && net.len = {host}; export none; }};\n\
             }}\n\n",
            proto = host_routes::PROTO,
        );
    }
    let keepalive = (bgp.hold_time / 3).max(1);
    for (i, peer) in bgp.peers.iter().enumerate() {
        let family = match peer.address {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        };
        let _ = write!(
            out,
            "# The hold timer withdraws this node's routes {hold} s after BIRD or the link dies;\n\
             # the agent withdraws them itself when it stops on purpose or the node is drained.\n\
             protocol bgp peer{n} {{\n\
             \x20 local as {local};\n\
             \x20 neighbor {addr} as {asn};\n\
             \x20 hold time {hold};\n\
             \x20 keepalive time {keepalive};\n\
             \x20 connect delay time 1;\n\
             \x20 connect retry time 2;\n\
             \x20 # After a failure (hold timer expired, link down) the session starts again\n\
             \x20 # 1 s later, not BIRD's default 60 s: a path back is used at once; failures\n\
             \x20 # in a row back off to 60 s.\n\
             \x20 error wait time 1, 60;\n\
             \x20 # A restart must not keep this node's routes at the peer (stale) either.\n\
             \x20 graceful restart off;\n\
             \x20 {family} {{ import none; export where proto = \"xdpgate_{family}\"; next hop self; }};\n\
             }}\n\n",
            n = i + 1,
            hold = bgp.hold_time,
            local = bgp.local_as,
            addr = peer.address,
            asn = peer.asn,
        );
    }
    out
}
