#!/usr/bin/env bash
# One idempotent setup for a fresh Debian machine: everything the eBPF build and the
# tests need. Fast (a few checks, no network) when everything is already installed.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (XDP and namespaces need it)" >&2; exit 1; }; }
need_root

# Debian packages: LLVM 22 for bpf-linker, and the tools the tests and benchmarks use
# (graphviz: `dot`, which `xdpgate topology --format svg` runs; bird2: the BGP daemon
# tests/e2e_bgp.rs runs in its namespaces; strace: kills a command at a chosen system call
# in tests/e2e_nsg.rs).
pkgs=(llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 iputils-ping procps bpftool tcpdump nftables iperf3
      netsniff-ng xdp-tools curl python3 ethtool graphviz bird2 strace)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The tests start their own bird per namespace (own config, -s socket, -P pid file): no
# host-wide bird with Debian's default config, which would peer with nothing and hold
# /run/bird/bird.ctl.
if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled --quiet bird.service 2>/dev/null; then
  echo "setup: disabling the host-wide bird.service"
  systemctl disable bird.service >/dev/null 2>&1 || true
  [ -d /run/systemd/system ] && systemctl stop bird.service || true
fi
if [ -f /run/bird/bird.pid ] && kill -0 "$(cat /run/bird/bird.pid)" 2>/dev/null; then
  kill "$(cat /run/bird/bird.pid)"
fi

# aya-build compiles the eBPF crate with nightly and -Z build-std=core.
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "setup: adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly
fi

# bpf-linker, linked against Debian's LLVM 22.
if ! command -v bpf-linker >/dev/null 2>&1; then
  echo "setup: building bpf-linker against LLVM 22 (takes a few minutes once)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --no-default-features --features llvm-22
fi

# bpffs for pinned maps, root's alone (as systemd mounts it): in the kernel's default mode
# 1777 any user could make xdpgate's pin directory first and unlink its links.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
  mount -t bpf -o mode=0700,nosuid,nodev bpf /sys/fs/bpf
fi
