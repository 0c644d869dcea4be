//! deploy/backend/xdpgate-backend.sh's `up` and `down` against what an operator does
//! around them: a default route changed between two `up`s, a stricter advmss of its own,
//! addresses on lo the script did not add, a gateway family missing, a namespace deleted
//! and created again under its name, a pin directory spelt another way. Each `up` uses
//! xdpgate's decap program (the machine's kernel has no ipip module); no packet is sent.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use common::{Netns, Pins, run, veth};
use serde_json::{Value, json};
use xdpgate_dataplane::decap;

const VIP4: &str = "192.0.2.10";
const VIP4B: &str = "192.0.2.11";
const VIP6: &str = "2001:db8::10";
/// The backend's neighbours on its link: the router and the gateways.
const ROUTER4: &str = "198.51.100.1";
const ROUTER4B: &str = "198.51.100.3";
const ROUTER6: &str = "2001:db8:1::1";
const BACKEND4: &str = "198.51.100.2";
const BACKEND6: &str = "2001:db8:1::2";
const GATEWAY4: &str = "198.51.100.1";
const GATEWAY6: &str = "2001:db8:1::1";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/backend/xdpgate-backend.sh")
}

/// A backend namespace with one link (to a peer namespace) and default routes over it,
/// `proto static metric 5` as an operator would set them.
struct Lab {
    // Field order is drop order: detach (needs the namespace) before the namespaces go.
    pins: Pins,
    _peer: Netns,
    backend: Netns,
    b_if: String,
}

impl Lab {
    fn new() -> Self {
        let peer = Netns::new("xbsp");
        let backend = Netns::new("xbs");
        let (_, b_if) = link(&peer, &backend);
        let pins = Pins::in_netns(&backend);
        Lab { pins, _peer: peer, backend, b_if }
    }

    /// The script with `args`, then `--netns` and `pin_dir` (none: the option left out).
    fn script_in(&self, args: &[&str], pin_dir: Option<&str>) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg(script()).args(args).args(["--netns", &self.backend.name]);
        if let Some(dir) = pin_dir {
            cmd.args(["--pin-dir", dir]);
        }
        cmd.env("XDPGATE", common::xdpgate_bin()).output().expect("run the backend script")
    }

    fn pin_dir(&self) -> String {
        self.pins.dir.path().to_string_lossy().into_owned()
    }

    /// The script against this lab's namespace and pin directory.
    fn script(&self, args: &[&str]) -> Output {
        self.script_in(args, Some(&self.pin_dir()))
    }

    fn script_ok(&self, args: &[&str]) -> String {
        let out = self.script(args);
        assert!(out.status.success(), "xdpgate-backend.sh {args:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `up` of `frontends` with xdpgate's program on the lab's link, and `more` options
    /// (the gateways named there, else both of the lab's).
    fn up(&self, frontends: &[&str], more: &[&str]) -> Output {
        let decap = ["--decap", "xdpgate", "--interface", &self.b_if];
        let mut args = [&["up"][..], frontends, &decap].concat();
        if !more.contains(&"--gateway") {
            args.extend(["--gateway", GATEWAY4, "--gateway", GATEWAY6]);
        }
        args.extend(more);
        self.script(&args)
    }

    fn up_ok(&self, frontends: &[&str], more: &[&str]) -> String {
        let out = self.up(frontends, more);
        assert!(out.status.success(), "up {frontends:?} {more:?}:\n{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn route(&self, family: &str) -> String {
        let out = self.backend.exec("ip", &[family, "route", "show", "default"]).stdout;
        String::from_utf8_lossy(&out).trim().to_string()
    }

    fn lo_addrs(&self) -> String {
        let out = self.backend.exec("ip", &["addr", "show", "dev", "lo"]).stdout;
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.pins.xdpgate(&["decap", "status", "--json"])).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

/// A link from `peer` to `backend` with the backend's default routes over it.
fn link(peer: &Netns, backend: &Netns) -> (String, String) {
    let (p_if, b_if) = veth(
        peer,
        &format!("{ROUTER4}/24,{ROUTER4B}/24,{ROUTER6}/64"),
        backend,
        &format!("{BACKEND4}/24,{BACKEND6}/64"),
    );
    for (family, router) in [("-4", ROUTER4), ("-6", ROUTER6)] {
        let route = ["route", "add", "default", "via", router, "proto", "static", "metric", "5"];
        backend.exec("ip", &[&[family][..], &route].concat());
    }
    (p_if, b_if)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A later `up` lowers the MSS on the default route as it is then, and `down` takes only
/// its advmss off the route as it is then: a gateway changed between them stays (seen
/// failing: both put back the route saved at the first `up`). An advmss the operator set
/// after `up` stays too.
#[test]
fn a_later_up_and_down_keep_a_changed_default_route() {
    let lab = Lab::new();
    lab.up_ok(&[VIP4], &[]);
    assert!(lab.route("-4").contains("advmss 1440"), "{}", lab.route("-4"));
    let moved = format!("default via {ROUTER4B} dev {} proto static metric 5", lab.b_if);
    let replace: Vec<&str> = ["route", "replace"].into_iter().chain(moved.split(' ')).collect();
    lab.backend.exec("ip", &replace);
    lab.up_ok(&[VIP4B], &[]);
    assert_eq!(lab.route("-4"), format!("{moved} advmss 1440"), "the gateway change was undone");
    lab.script_ok(&["down"]);
    assert_eq!(lab.route("-4"), moved);

    // The operator's own advmss, set after `up`: `down` leaves it.
    lab.up_ok(&[VIP4], &[]);
    let own: Vec<&str> = ["route", "change"].into_iter().chain(moved.split(' ')).collect();
    lab.backend.exec("ip", &[&own[..], &["advmss", "1300"]].concat());
    lab.script_ok(&["down"]);
    assert_eq!(lab.route("-4"), format!("{moved} advmss 1300"));
}

/// `up` keeps an advmss of the route's own that is lower than the one it would set, and
/// `down` leaves it (seen failing: raised to 1440, and back to 1200 at `down`).
#[test]
fn a_stricter_advmss_of_the_routes_own_is_kept() {
    let lab = Lab::new();
    let own = ["route", "change", "default", "via", ROUTER4, "proto", "static", "metric", "5"];
    lab.backend.exec("ip", &[&own[..], &["advmss", "1200"]].concat());
    let before = lab.route("-4");
    lab.up_ok(&[VIP4, VIP6], &[]);
    assert_eq!(lab.route("-4"), before);
    assert!(lab.route("-6").contains("advmss 1400"), "{}", lab.route("-6"));
    lab.script_ok(&["down"]);
    assert_eq!(lab.route("-4"), before);
    assert!(!lab.route("-6").contains("advmss"), "{}", lab.route("-6"));
}

/// `down` deletes from lo only the addresses `up` added: not one that was there before
/// `up`, nor one named to `down` that is not served (seen failing: both deleted); a
/// loopback address is no frontend, refused (seen failing: `down ::1` deleted it).
#[test]
fn down_removes_only_the_addresses_up_added() {
    const ELSE: &str = "192.0.2.99";
    let lab = Lab::new();
    let on_lo = |addr: &str| lab.lo_addrs().contains(&format!(" {addr}/"));
    lab.backend.exec("ip", &["addr", "add", &format!("{VIP4B}/32"), "dev", "lo"]);
    lab.up_ok(&[VIP4, VIP4B], &[]);
    lab.backend.exec("ip", &["addr", "add", &format!("{ELSE}/32"), "dev", "lo"]);
    let out = lab.script(&["down", ELSE]);
    assert!(out.status.success() && text(&out).contains("not served"), "{}", text(&out));
    assert!(on_lo(ELSE), "down deleted an address it was not serving");
    assert_eq!(lab.status()["frontends"], json!([VIP4, VIP4B]));
    for loopback in ["::1", "127.0.0.1"] {
        let out = lab.script(&["down", loopback]);
        let err = text(&out);
        assert!(!out.status.success() && err.contains("not a frontend"), "{loopback}: {err}");
        assert!(on_lo(loopback), "down {loopback} deleted it");
    }
    lab.script_ok(&["down"]);
    assert!(!on_lo(VIP4), "{}", lab.lo_addrs());
    assert!(on_lo(VIP4B), "down deleted an address that was there before up");
    assert!(on_lo(ELSE));
}

/// `down` finishes when the program no longer decapsulates for a frontend the script
/// recorded (removed by hand, or recorded under another spelling): seen failing once
/// `decap remove` refused such a frontend: `down` stopped half done, its addresses and
/// records gone, the program attached and its nftables table left.
#[test]
fn down_finishes_when_a_frontend_was_removed_from_the_program() {
    let lab = Lab::new();
    lab.up_ok(&[VIP4, VIP4B], &[]);
    lab.pins.xdpgate(&["decap", "remove", "--frontend", VIP4]);
    lab.script_ok(&["down"]);
    assert!(!lab.lo_addrs().contains(&format!(" {VIP4B}/")), "{}", lab.lo_addrs());
    assert!(decap::attached(&lab.pins.dir).unwrap_or_default().is_empty(), "still attached");
    let table = lab.backend.try_exec("nft", &["list", "table", "inet", "xdpgate_backend"]);
    assert!(!table.status.success(), "the nftables table outlived down");
    // `decap remove` itself still refuses such a frontend without --missing-ok.
    lab.up_ok(&[VIP4], &[]);
    let out = lab.pins.try_xdpgate(&["decap", "remove", "--frontend", VIP4B]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = lab.pins.xdpgate(&["decap", "remove", "--missing-ok", "--frontend", VIP4B]);
    assert!(out.contains(&format!("not decapsulated for: {VIP4B}")), "{out}");
    assert_eq!(lab.status()["frontends"], json!([VIP4]));
}

/// An IPv6 frontend written in capitals is the one `decap status` shows in lower case:
/// `down` of either spelling stops it (seen failing: "not served here", exit 0).
#[test]
fn down_takes_an_ipv6_frontend_however_its_letters_are_written() {
    let lab = Lab::new();
    lab.up_ok(&[VIP4, "2001:DB8::10"], &[]);
    assert_eq!(lab.status()["frontends"], json!([VIP4, VIP6]));
    let out = lab.script_ok(&["down", VIP6]);
    assert!(!out.contains("not served"), "{out}");
    assert_eq!(lab.status()["frontends"], json!([VIP4]));
    assert!(!lab.lo_addrs().contains("2001:db8::10/"), "{}", lab.lo_addrs());
}

/// A frontend of a family no gateway is of is refused, as its encapsulated packets would
/// be dropped while the gateways' plain health probes pass (seen failing: accepted), at
/// `up` and at `down --gateway` taking the family's last gateway (seen failing: done),
/// nothing changed; with that family's last frontend, that gateway may go.
#[test]
fn a_frontend_family_needs_a_gateway_of_its_family() {
    let lab = Lab::new();
    let out = lab.up(&[VIP4, VIP6], &["--gateway", "203.0.113.0/24"]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("no IPv6 gateway"), "{err}");
    assert!(!lab.lo_addrs().contains(VIP4), "{}", lab.lo_addrs());
    assert!(!decap::dir(&lab.pins.dir).path().exists(), "a refused up attached");
    lab.up_ok(&[VIP4], &["--gateway", GATEWAY4]);
    let out = lab.up(&[VIP6], &["--gateway", GATEWAY4]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("no IPv6 gateway"), "{err}");
    assert_eq!(lab.status()["frontends"], json!([VIP4]));
    lab.up_ok(&[VIP6], &["--gateway", GATEWAY6]);
    let both = json!([format!("{GATEWAY4}/32"), format!("{GATEWAY6}/128")]);
    assert_eq!(lab.status()["gateways"], both);

    let out = lab.script(&["down", "--gateway", GATEWAY6]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("no IPv6 gateway"), "{err}");
    assert_eq!(lab.status()["gateways"], both);
    lab.script_ok(&["down", "--gateway", GATEWAY6, VIP6]);
    let status = lab.status();
    assert_eq!(status["gateways"], json!([format!("{GATEWAY4}/32")]), "{status}");
    assert_eq!(status["frontends"], json!([VIP4]), "{status}");
}

/// A namespace deleted and created again under its name starts afresh: the dead one's
/// frontend and gateway, pinned under its pin directory, go with its state (seen failing:
/// the new namespace's program decapsulated from the old gateway for the old frontend).
#[test]
fn a_recreated_namespace_gets_none_of_the_old_pins() {
    let lab = Lab::new();
    lab.up_ok(&[VIP4], &["--gateway", "198.51.100.5"]);
    run("ip", &["netns", "del", &lab.backend.name]);
    run("ip", &["netns", "add", &lab.backend.name]);
    let peer = Netns::new("xbsp");
    let (_, b_if) = link(&peer, &lab.backend);
    let up = ["up", VIP4B, "--decap", "xdpgate", "--interface", &b_if, "--gateway", "198.51.100.6"];
    lab.script_ok(&up);
    let status = lab.status();
    assert_eq!(status["frontends"], json!([VIP4B]), "{status}");
    assert_eq!(status["gateways"], json!(["198.51.100.6/32"]), "{status}");
    lab.script_ok(&["down"]);
    assert!(!decap::dir(&lab.pins.dir).path().exists());
}

/// Decap pins the script did not record (a program attached by hand, or its state lost):
/// `up` does not add to them, and `down` does not claim nothing was served; both say why,
/// changing nothing (seen failing: `up` took them over, `down` said "no frontend served").
#[test]
fn pins_the_script_did_not_record_are_left_alone() {
    let lab = Lab::new();
    let attach = ["decap", "attach", &lab.b_if, "--frontend", VIP4B, "--gateway", "203.0.113.0/24"];
    lab.pins.xdpgate(&attach);
    let before = lab.status();
    let out = lab.up(&[VIP4], &[]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("decap detach --all"), "{err}");
    assert!(!lab.lo_addrs().contains(VIP4), "{}", lab.lo_addrs());
    let out = lab.script(&["down"]);
    let err = text(&out);
    assert!(!out.status.success() && err.contains("decap detach --all"), "{err}");
    let after = lab.status();
    assert_eq!(after["frontends"], before["frontends"], "{after}");
    assert_eq!(after["gateways"], before["gateways"], "{after}");
    lab.pins.xdpgate(&["decap", "detach", "--all"]);
    // Idempotent: nothing left, nothing to say.
    lab.script_ok(&["down"]);
}

/// `down` finds the state `up` left whatever the spelling of the same pin directory (seen
/// failing with a trailing slash: "no frontend served", everything left); without
/// `--pin-dir`, another pin directory, it undoes nothing and names the one `up` was given.
#[test]
fn down_finds_the_state_of_a_pin_dir_however_spelt() {
    let lab = Lab::new();
    lab.up_ok(&[VIP4], &[]);
    let out = lab.script_in(&["down"], None);
    let err = text(&out);
    let says = format!("--pin-dir {}", lab.pin_dir());
    assert!(!out.status.success() && err.contains(&says), "{err}");
    assert_eq!(lab.status()["frontends"], json!([VIP4]));
    let out = lab.script_in(&["down"], Some(&format!("{}//", lab.pin_dir())));
    assert!(out.status.success() && text(&out).contains("no frontend served"), "{}", text(&out));
    assert!(!lab.lo_addrs().contains(VIP4), "{}", lab.lo_addrs());
    assert!(!decap::dir(&lab.pins.dir).path().exists(), "down left the program");
    assert!(!lab.route("-4").contains("advmss"), "{}", lab.route("-4"));
}

/// Runs of the script take turns (units for several namespaces start at once, and each run
/// cleans up the state of every namespace, which another run may be writing): an `up`
/// waits while another run holds the lock, changing nothing, and goes on once it is free
/// (seen failing: it went on at once).
#[test]
fn runs_of_the_script_take_turns() {
    use std::os::fd::AsRawFd;
    let lab = Lab::new();
    std::fs::create_dir_all("/run/xdpgate-backend").unwrap();
    let lock = std::fs::File::create("/run/xdpgate-backend/.lock").unwrap();
    // SAFETY: flock(2) on our own open file.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    std::thread::scope(|s| {
        let up = s.spawn(|| lab.up(&[VIP4], &[]));
        std::thread::sleep(std::time::Duration::from_secs(2));
        let waited = !up.is_finished();
        let untouched = !decap::dir(&lab.pins.dir).path().exists();
        drop(lock);
        let out = up.join().unwrap();
        assert!(waited && untouched, "went on beside another run: {}", text(&out));
        assert!(out.status.success(), "{}", text(&out));
    });
    assert_eq!(lab.status()["frontends"], json!([VIP4]));
    lab.script_ok(&["down"]);
}
