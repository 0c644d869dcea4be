//! Least privilege: the agent's commands work with only CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN (what deploy/xdpgate.service grants), and loading programs fails clearly
//! without CAP_BPF.
//! The pins it creates are private to their owner.

mod common;

use std::{os::unix::fs::PermissionsExt, process::Command};

use common::{Netns, run, unique, xdpgate_bin};

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

struct Bpffs(String);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn runs_with_only_bpf_perfmon_and_net_admin() {
    let a = Netns::new("pa");
    let b = Netns::new("pb");
    let (_, ib) = common::veth(&a, "198.51.100.1/24", &b, "198.51.100.2/24");
    // A bpffs of the test's own outside /sys, which `ip netns exec` leaves visible.
    let mnt = format!("/run/{}", unique("xgbpf"));
    std::fs::create_dir_all(&mnt).unwrap();
    run("mount", &["-t", "bpf", "bpf", &mnt]);
    let _bpffs = Bpffs(mnt.clone());
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
    ok(&["attach", "--iface", &ib, "--role", "internal"]);
    ok(&["apply", policy.to_str().unwrap()]);
    assert!(ok(&["stats", "--json"]).contains(&ib));
    ok(&["upgrade"]);
    // The pins are the owner's alone.
    for dir in [pins.clone(), format!("{pins}/links")] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir}");
    }

    // Without CAP_BPF no program can be loaded, and the error says so. (Opening pinned maps
    // is governed by the pins' file permissions: hence mode 0700 above.)
    let out = xdpgate_with(&b, "+net_admin,+perfmon", &pins, &["upgrade"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("permission") || err.contains("operation not permitted"), "{err}");

    ok(&["detach", "--all"]);
    let _ = std::fs::remove_file(&policy);
    let _ = std::fs::remove_dir_all(
        std::path::Path::new("/run/xdpgate").join(pins.trim_matches('/').replace('/', "_")),
    );
}
