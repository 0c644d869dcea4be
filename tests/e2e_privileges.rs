//! Least privilege: the agent's commands work with only CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN (what deploy/xdpgate.service grants), and loading programs fails clearly
//! without CAP_BPF.
//! The pins it creates are private to their owner, and it uses no pin directory that
//! anyone but root could change: a user who could unlink `links/<if>` would detach the
//! filter. A user without privileges is told so by every command that reads the dataplane.
//! `status` finds links attached in other network namespaces.

mod common;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{Netns, run, unique, xdpgate_bin};
use serde_json::Value;

/// What every refusal for want of privileges says.
const DENIED: &str = "permission denied: needs root or CAP_BPF";

/// Runs xdpgate inside `ns` as uid 0 holding only `caps` (no CAP_SYS_ADMIN, no
/// CAP_DAC_OVERRIDE, ...).
fn xdpgate_with(ns: &Netns, caps: &str, pin_dir: &str, args: &[&str]) -> std::process::Output {
    let caps_arg = format!("-all,{caps}");
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .args(["--bounding-set", &caps_arg, "--inh-caps", &caps_arg, "--ambient-caps", &caps_arg])
        .arg(xdpgate_bin())
        .args(["--pin-dir", pin_dir])
        .args(args)
        .output()
        .expect("spawn setpriv")
}

/// A bpffs of the test's own outside /sys (which `ip netns exec` leaves visible), mounted
/// with the kernel's default mode 1777, in which any user can make a directory: what
/// `setup.sh` and xdpgate used to mount. Unmounting it drops every pin in it.
struct Bpffs(String);

impl Bpffs {
    fn new() -> Self {
        let mnt = format!("/run/{}", unique("xgbpf"));
        std::fs::create_dir_all(&mnt).unwrap();
        run("mount", &["-t", "bpf", "bpf", &mnt]);
        Self(mnt)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let pins = xdpgate_dataplane::PinDir::new(format!("{}/xdpgate", self.0));
        let _ = std::fs::remove_dir_all(xdpgate_dataplane::state::dir(&pins));
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn runs_with_only_bpf_perfmon_and_net_admin() {
    let a = Netns::new("pa");
    let b = Netns::new("pb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    // A second interface, attached at tc ingress.
    let (_, ib_tc) = common::veth(&a, "198.51.101.1/24", &b, "198.51.101.2/24");
    // A third, for the backend's decapsulation program.
    let (_, ib_decap) = common::veth(&a, "198.51.102.1/24", &b, "198.51.102.2/24");
    let bpffs = Bpffs::new();
    let mnt = bpffs.0.clone();
    let pins = format!("{mnt}/xdpgate");
    let policy = std::env::temp_dir().join(format!("{}.yaml", unique("priv")));
    std::fs::write(&policy, "virtual_network: {address_space: [198.51.100.0/24]}\nnsgs:\n  - name: n\n    subnets: [198.51.100.0/24]\n    rules: []\n").unwrap();

    let needed = "+bpf,+perfmon,+net_admin";
    let ok = |args: &[&str]| {
        let out = xdpgate_with(&b, needed, &pins, args);
        assert!(
            out.status.success(),
            "xdpgate {args:?} with {needed}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["attach", "--hook", "xdp", "--iface", &ib, "--role", "internal"]);
    ok(&["attach", "--iface", &ib_tc, "--role", "external", "--hook", "tc"]);
    ok(&["apply", policy.to_str().unwrap()]);
    let stats = ok(&["stats", "--json"]);
    assert!(stats.contains(&ib) && stats.contains(&ib_tc), "{stats}");
    let summary = ok(&["capture", "--duration", "0.2", "-w", "/dev/null"]);
    assert!(summary.is_empty(), "the summary goes to standard error: {summary}");
    // Its check that the interface is attached reads the pinned link: no more privilege.
    ok(&["capture", "--iface", &ib_tc, "--duration", "0.2", "-w", "/dev/null"]);
    // trace opens the attached program by its id, which the kernel allows CAP_SYS_ADMIN
    // alone: refused, saying so.
    let out = xdpgate_with(
        &b,
        needed,
        &pins,
        &[
            "trace",
            "--iface",
            &ib_tc,
            "--src",
            "198.51.101.2",
            "--dst",
            "198.51.101.1",
            "--protocol",
            "icmp",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs CAP_SYS_ADMIN"), "{err}");
    let upgraded = ok(&["upgrade"]);
    assert!(upgraded.contains(&format!("upgraded {ib_tc}")), "{upgraded}");
    // The pins are the owner's alone.
    for dir in [pins.clone(), format!("{pins}/links"), format!("{pins}/egress")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir}");
    }

    // Without CAP_BPF no program can be loaded, and the error says so. (Opening pinned maps
    // is governed by the pins' file permissions: hence mode 0700 above.)
    let out = xdpgate_with(&b, "+net_admin,+perfmon", &pins, &["upgrade"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("permission") || err.contains("operation not permitted"), "{err}");

    // The backend's decapsulation program, alike; refused without CAP_BPF, leaving nothing.
    let decap =
        ["decap", "attach", ib_decap.as_str(), "--frontend", "192.0.2.10", "--gateway", "10.0.0.1"];
    let out = xdpgate_with(&b, "+net_admin,+perfmon", &pins, &decap);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(DENIED), "{err}");
    assert!(!std::path::Path::new(&format!("{pins}/decap")).exists());
    ok(&decap);
    let status = ok(&["decap", "status", "--json"]);
    assert!(status.contains(&ib_decap) && status.contains("192.0.2.10"), "{status}");
    let mode = std::fs::metadata(format!("{pins}/decap")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    ok(&["decap", "detach", &ib_decap]);

    ok(&["detach", "--all"]);
    let _ = std::fs::remove_file(&policy);
    let _ = std::fs::remove_dir_all(xdpgate_dataplane::state::dir(
        &xdpgate_dataplane::PinDir::new(&pins),
    ));
}

/// Runs a command as the unprivileged user `nobody`.
fn as_nobody(cmd: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", cmd])
        .args(args)
        .output()
        .expect("spawn setpriv")
}

/// Runs xdpgate as root with `--pin-dir pins` (and `--netns ns`, if any).
fn xdpgate(pins: &str, ns: Option<&Netns>, args: &[&str]) -> Output {
    let mut cmd = Command::new(xdpgate_bin());
    cmd.args(["--pin-dir", pins]);
    if let Some(ns) = ns {
        cmd.args(["--netns", &ns.name]);
    }
    cmd.args(args).output().expect("spawn xdpgate")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts that `out` failed and its error contains every one of `wanted`.
fn refused(out: Output, what: &str, wanted: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} succeeded: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    for w in wanted {
        assert!(err.contains(w), "{what}: error should say {w:?}: {err}");
    }
}

/// The XDP program on `ifname` in `ns`, as `ip` reports it (none: empty).
fn xdp_on(ns: &Netns, ifname: &str) -> String {
    let out = ns.exec("ip", &["-j", "-d", "link", "show", "dev", ifname]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json[0]["xdp"]["prog"]["name"].as_str().unwrap_or_default().to_string()
}

fn owner(path: &str) -> u32 {
    std::fs::symlink_metadata(path).unwrap().uid()
}

#[test]
fn pin_directories_anyone_but_root_could_change_are_refused() {
    let a = Netns::new("pra");
    let b = Netns::new("prb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let bpffs = Bpffs::new();
    let attach = |pins: &str| xdpgate(pins, Some(&b), &["attach", "--hook", "xdp", "--iface", &ib]);

    // The attack: a local user makes the pin directory before root's first attach.
    let squatted = format!("{}/xdpgate", bpffs.0);
    ok(as_nobody("mkdir", &[&squatted]), "nobody may mkdir in a 1777 bpffs");
    refused(
        attach(&squatted),
        "attach into nobody's directory",
        &[&squatted, "owned by uid 65534, not root", "chown"],
    );
    // Refused without a change: still nobody's, nothing pinned in it, nothing attached.
    assert_eq!(owner(&squatted), 65534);
    assert_eq!(std::fs::read_dir(&squatted).unwrap().count(), 0, "pins made in {squatted}");
    assert_eq!(xdp_on(&b, &ib), "");

    // A symlink (to a directory that root made) is refused, not followed.
    let real = format!("{}/real", bpffs.0);
    std::fs::create_dir(&real).unwrap();
    let link = format!("{}/linked", bpffs.0);
    ok(as_nobody("ln", &["-s", &real, &link]), "nobody may symlink in a 1777 bpffs");
    refused(attach(&link), "attach through a symlink", &[&link, "symbolic link"]);
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0, "pins made through {link}");

    // A directory of root's that others may write to.
    let open = format!("{}/open", bpffs.0);
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused(attach(&open), "attach into a 0777 directory", &[&open, "mode 0777", "chmod 0700"]);
    assert_eq!(xdp_on(&b, &ib), "");

    // Checked on every use, not only when made: once links/ is not root's, apply, the
    // views and detach refuse too, and the filter stays attached.
    let pins = format!("{}/good", bpffs.0);
    ok(attach(&pins), "attach into a fresh directory");
    assert_eq!(xdp_on(&b, &ib), "xdpgate");
    let links = format!("{pins}/links");
    std::os::unix::fs::chown(&links, Some(65534), None).unwrap();
    let policy = std::env::temp_dir().join(format!("{}.yaml", unique("prpol")));
    std::fs::write(&policy, "virtual_network: {address_space: [198.51.100.0/24]}\nnsgs: []\n")
        .unwrap();
    for args in [
        &["apply", policy.to_str().unwrap()][..],
        &["status"],
        &["flows"],
        &["stats"],
        &["detach", "--all"],
    ] {
        refused(xdpgate(&pins, Some(&b), args), &format!("{args:?}"), &[&links, "not root"]);
    }
    assert_eq!(xdp_on(&b, &ib), "xdpgate");
    std::os::unix::fs::chown(&links, Some(0), None).unwrap();
    // egress/ holds the links of the egress programs: checked alike.
    let egress = format!("{pins}/egress");
    std::os::unix::fs::chown(&egress, Some(65534), None).unwrap();
    for args in [&["status"][..], &["detach", "--all"]] {
        refused(xdpgate(&pins, Some(&b), args), &format!("{args:?}"), &[&egress, "not root"]);
    }
    std::os::unix::fs::chown(&egress, Some(0), None).unwrap();
    ok(xdpgate(&pins, Some(&b), &["detach", "--all"]), "detach once links/ is root's");
    assert_eq!(xdp_on(&b, &ib), "");
    let _ = std::fs::remove_file(&policy);
}

#[test]
fn a_user_without_privileges_is_told_so() {
    let a = Netns::new("pua");
    let b = Netns::new("pub");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let bpffs = Bpffs::new();
    let pins = format!("{}/xdpgate", bpffs.0);
    ok(xdpgate(&pins, Some(&b), &["attach", "--hook", "xdp", "--iface", &ib]), "attach");
    let policy = std::env::temp_dir().join(format!("{}.yaml", unique("pupol")));
    std::fs::write(&policy, "virtual_network: {address_space: [198.51.100.0/24]}\nnsgs: []\n")
        .unwrap();
    ok(xdpgate(&pins, Some(&b), &["apply", policy.to_str().unwrap()]), "apply");
    // World-readable, so that only the pins can stand in nobody's way.
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let bin = xdpgate_bin();
    for args in [
        &["status"][..],
        // In a namespace too: refused for the pins before the namespace is entered (before:
        // "setns ...: EPERM", status 1. Seen failing).
        &["--netns", &b.name, "status"],
        &["--netns", &b.name, "detach", "--iface", &ib],
        &["status", "--json"],
        &["detach", "--all"],
        &["detach", "--iface", &ib],
        &["flows"],
        &["stats"],
        &["lb"],
        &["lb", "drain", "edge", "198.51.100.9"],
        &["set", "list"],
        &["set", "add", "blocklist", "192.0.2.1"],
        &["nat"],
        &["rules"],
        &[
            "verify-flow",
            "--direction",
            "inbound",
            "--protocol",
            "icmp",
            "--local",
            "198.51.100.2",
            "--remote",
            "203.0.113.9",
        ],
        &["metrics"],
        &["next-hop", "--src", "198.51.100.1", "--dst", "198.51.100.2"],
        &["connectivity", "--src", "198.51.100.1", "--dst", "198.51.100.2:80"],
        &["topology"],
        &["observe", "--count", "1"],
        &["capture", "--count", "1", "-w", "/dev/null"],
        &[
            "trace",
            "--iface",
            &ib,
            "--src",
            "203.0.113.9",
            "--dst",
            "198.51.100.2",
            "--protocol",
            "icmp",
        ],
        &["upgrade"],
        &["apply", policy.to_str().unwrap()],
        &["apply", "--diff", policy.to_str().unwrap()],
        &["plan", policy.to_str().unwrap()],
        &["flows", "delete", "--all"],
        &["flows", "delete", "--all", "--dry-run"],
        &["bgp"],
        &["drain"],
        &["undrain", "--wait", "1"],
    ] {
        let mut full = vec!["--pin-dir", &pins];
        full.extend_from_slice(args);
        let out = as_nobody(bin.to_str().unwrap(), &full);
        assert_eq!(out.status.code(), Some(77), "xdpgate {args:?} as nobody: {out:?}");
        refused(out, &format!("xdpgate {args:?} as nobody"), &[DENIED, &pins]);
    }
    // Nothing changed: still attached, and root sees it.
    assert_eq!(xdp_on(&b, &ib), "xdpgate");
    let status = ok(xdpgate(&pins, Some(&b), &["status"]), "status as root");
    assert!(status.contains(&ib) && !status.contains("not attached"), "{status}");
    let _ = std::fs::remove_file(&policy);
}

#[test]
fn status_names_the_namespace_a_link_lives_in() {
    let a = Netns::new("psa");
    let b = Netns::new("psb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let bpffs = Bpffs::new();
    let pins = format!("{}/xdpgate", bpffs.0);
    ok(
        xdpgate(
            &pins,
            Some(&b),
            &["attach", "--hook", "xdp", "--iface", &ib, "--role", "internal"],
        ),
        "attach",
    );
    let status = |ns: Option<&Netns>| -> Value {
        serde_json::from_str(&ok(xdpgate(&pins, ns, &["status", "--json"]), "status")).unwrap()
    };
    let only = |s: &Value| -> Value {
        let list = s["interfaces"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{s:#}");
        list[0].clone()
    };

    // Asked from the host's namespace: the link is in b, under b's name.
    let i = only(&status(None));
    assert_eq!(
        (i["place"].as_str(), i["netns"].as_str()),
        (Some("netns"), Some(&*b.name)),
        "{i:#}"
    );
    assert_eq!((i["xdp_mode"].as_str(), i["program"].as_str()), (Some("native"), Some("xdpgate")));
    assert_eq!(i["role"], "internal");
    assert!(i["ifindex"].as_u64().is_some_and(|n| n > 0), "{i:#}");
    let text = ok(xdpgate(&pins, None, &["status"]), "status");
    assert!(text.contains(&format!("{ib} in netns {}", b.name)), "{text}");
    assert!(!text.contains("gone"), "{text}");
    // `stats` from the host names the interface as attached, not after whichever host
    // interface has its ifindex.
    let stats: Value =
        serde_json::from_str(&ok(xdpgate(&pins, None, &["stats", "--json"]), "stats")).unwrap();
    assert_eq!(stats["interfaces"][0]["interface"].as_str(), Some(ib.as_str()), "{stats:#}");

    // Asked from b: here.
    let i = only(&status(Some(&b)));
    assert_eq!((i["place"].as_str(), i["netns"].as_str()), (Some("here"), None), "{i:#}");

    // "gone" only once the link is really detached: its device deleted.
    b.exec("ip", &["link", "del", &ib]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let i = loop {
        let i = only(&status(None));
        if i["place"] == "gone" || Instant::now() > deadline {
            break i;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((i["place"].as_str(), &i["ifindex"]), (Some("gone"), &Value::Null), "{i:#}");
    let text = ok(xdpgate(&pins, None, &["status"]), "status");
    assert!(text.contains("gone"), "{text}");
}

#[test]
fn xdpgate_mounts_bpffs_for_root_alone() {
    let a = Netns::new("pma");
    let b = Netns::new("pmb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    // A mount namespace of the test's own without bpffs at /sys/fs/bpf: attach mounts one
    // there. The namespace, that bpffs and the pins in it go when the shell exits.
    let script = format!(
        "umount /sys/fs/bpf && {} --netns {} --pin-dir /sys/fs/bpf/xdpgate attach --iface {ib} \
         >/dev/null && stat -c '%a %U' /sys/fs/bpf && grep ' /sys/fs/bpf ' /proc/self/mounts",
        xdpgate_bin().display(),
        b.name
    );
    let out = run("unshare", &["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = String::from_utf8(out.stdout).unwrap();
    let mut lines = out.lines();
    // The kernel adds the sticky bit whatever the mode.
    assert_eq!(lines.next(), Some("1700 root"), "{out}");
    assert!(lines.next().is_some_and(|m| m.contains("mode=700")), "{out}");
    // The pinned link went with its bpffs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !xdp_on(&b, &ib).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(xdp_on(&b, &ib), "", "still attached after its bpffs went");
}

#[test]
fn detach_from_another_namespace_forgets_the_interface() {
    use aya::maps::HashMap;
    use xdpgate_common::{iface::IfaceConfig, maps::IFACES};

    let a = Netns::new("pda");
    let b = Netns::new("pdb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    let bpffs = Bpffs::new();
    let pins = format!("{}/xdpgate", bpffs.0);
    ok(xdpgate(&pins, Some(&b), &["attach", "--hook", "xdp", "--iface", &ib]), "attach");
    let registered = || -> Vec<u32> {
        let map = xdpgate_dataplane::PinDir::new(&pins).open_map(IFACES).unwrap();
        let ifaces: HashMap<_, u32, IfaceConfig> = map.try_into().unwrap();
        ifaces.keys().map(|k| k.unwrap()).collect()
    };
    assert_eq!(registered().len(), 1);
    // From the host's namespace, where no device has that name: the link says which
    // ifindex it was registered under.
    ok(xdpgate(&pins, None, &["detach", "--iface", &ib]), "detach from the host");
    assert_eq!(xdp_on(&b, &ib), "");
    assert_eq!(registered(), Vec::<u32>::new(), "the interface is still registered");
}
