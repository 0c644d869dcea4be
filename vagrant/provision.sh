#!/usr/bin/env bash
# Provisioning for the xdpgate VM (vagrant/Vagrantfile), in steps that can each be run again
# and do nothing when already done:
#
#   provision.sh kernel   a kernel of at least $XDPGATE_MIN_KERNEL (default 6.12) with the
#                         pktgen module: on Debian 12, bookworm-backports' (bookworm's own
#                         6.1 has pktgen but predates what the dataplane is developed on);
#                         reboot afterwards when it says so (the Vagrantfile does)
#   provision.sh setup    base packages, Rust (rustup, stable and nightly + rust-src), then
#                         the project's own setup.sh, as the README does
#   provision.sh build    cargo build --release -p xdpgate -p xdpgate-pktgen
#   provision.sh check    report what the benchmark needs: pktgen, bpffs, the binary
#
# Several steps may be given in order (default: setup build). The workspace is the parent
# of this script's directory (/xdpgate in the VM). Run as root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIN_KERNEL="${XDPGATE_MIN_KERNEL:-6.12}"
export DEBIAN_FRONTEND=noninteractive

[ "$(id -u)" = 0 ] || { echo "provision.sh: run as root" >&2; exit 1; }
# Rust lives in root's home whatever sudo passed on.
HOME="$(getent passwd root | cut -d: -f6)"
export HOME

log() { echo "provision: $*"; }

# Installs the Debian packages among "$@" that are missing.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Whether version $1 (e.g. 6.12.9+bpo-amd64) is at least $MIN_KERNEL.
new_enough() {
  local v="${1%%[-+]*}"
  [ "$(printf '%s\n' "$MIN_KERNEL" "$v" | sort -V | head -n 1)" = "$MIN_KERNEL" ]
}

# Whether a kernel (default: the running one) has pktgen, built in or as a module.
has_pktgen() {
  local release="${1:-$(uname -r)}"
  [ -d /proc/net/pktgen ] && [ "$release" = "$(uname -r)" ] && return 0
  grep -qsE '^CONFIG_NET_PKTGEN=(y|m)' "/boot/config-$release" && return 0
  find "/lib/modules/$release" -name 'pktgen.ko*' 2>/dev/null | grep -q .
}

step_kernel() {
  if new_enough "$(uname -r)" && has_pktgen; then
    log "kernel $(uname -r) is new enough and has pktgen"
    return
  fi
  . /etc/os-release
  if [ "${ID:-}" != debian ] || [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "provision.sh kernel: kernel $(uname -r) is older than $MIN_KERNEL or has no pktgen," \
         "and this is not Debian 12: install a kernel with CONFIG_NET_PKTGEN=m by hand" >&2
    exit 1
  fi
  # Backports: a 6.x kernel newer than bookworm's own, built with CONFIG_NET_PKTGEN=m.
  local list=/etc/apt/sources.list.d/bookworm-backports.list
  if ! grep -qs bookworm-backports /etc/apt/sources.list "$list"; then
    log "adding bookworm-backports"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
  fi
  log "installing the backports kernel"
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports linux-image-amd64 >/dev/null
  local newest
  newest=$(ls /lib/modules | sort -V | tail -n 1)
  if ! new_enough "$newest" || ! has_pktgen "$newest"; then
    echo "provision.sh kernel: the newest kernel, $newest, is older than $MIN_KERNEL or has" \
         "no pktgen module" >&2
    exit 1
  fi
  if [ "$newest" = "$(uname -r)" ]; then
    log "kernel $newest is running"
  else
    # GRUB boots the newest installed kernel by default.
    log "kernel $newest (with pktgen) installed: reboot into it"
  fi
}

step_setup() {
  # What the Rust toolchain and the build need before setup.sh can run.
  apt_install ca-certificates curl git build-essential pkg-config rsync
  # Rust for root, through rustup, as the README assumes.
  if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
  if ! command -v rustup >/dev/null 2>&1; then
    log "installing rustup and stable Rust"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --profile minimal --default-toolchain stable
    . "$HOME/.cargo/env"
  fi
  # The workspace wants 1.95 or later: bring an older stable up to date.
  local have
  have=$(rustc --version | awk '{print $2}')
  if [ "$(printf '%s\n' 1.95.0 "$have" | sort -V | head -n 1)" != 1.95.0 ]; then
    log "updating stable Rust ($have is older than 1.95)"
    rustup update stable
  fi
  # aya-build builds the eBPF crate with nightly; setup.sh adds rust-src to it.
  if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  # The project's own, idempotent setup: LLVM, bpf-linker, network tools, bpffs.
  log "running setup.sh"
  bash "$ROOT/setup.sh"
}

step_build() {
  if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
  log "building xdpgate and xdpgate-pktgen (release)"
  (cd "$ROOT" && cargo build --release -p xdpgate -p xdpgate-pktgen)
}

step_check() {
  local ok=1
  if modprobe pktgen 2>/dev/null && [ -d /proc/net/pktgen ]; then
    log "pktgen: loaded ($(ls /proc/net/pktgen | tr '\n' ' '))"
  else
    log "pktgen: NOT available in kernel $(uname -r) (run: provision.sh kernel, then reboot)"
    ok=0
  fi
  if mount | grep -q ' /sys/fs/bpf type bpf'; then log "bpffs: mounted"; else log "bpffs: not mounted"; ok=0; fi
  for bin in xdpgate xdpgate-pktgen; do
    if [ -x "$ROOT/target/release/$bin" ]; then
      log "$bin: $ROOT/target/release/$bin"
    else
      log "$bin: not built (run: provision.sh build)"
      ok=0
    fi
  done
  [ $ok = 1 ] && log "ready: sudo $ROOT/vagrant/pktgen-bench.sh"
  return 0
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(setup build)
for s in "${steps[@]}"; do
  case "$s" in
    kernel | setup | build | check) "step_$s" ;;
    *) echo "provision.sh: unknown step $s (kernel, setup, build, check)" >&2; exit 2 ;;
  esac
done
