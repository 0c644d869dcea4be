#!/usr/bin/env bash
# Line-rate benchmark with the kernel's pktgen against xdpgate, inside the VM (or any machine
# whose kernel has the pktgen module), over a veth pair between two network namespaces:
#
#   [xgpb-gen] xgpb-gen ==veth==> xgpb-dut [xgpb-dut]
#   kernel pktgen (kpktgend_N)     program in native mode: xdp_noop | xdpgate
#
# 60-byte UDP frames of 256 flows (64 source ports x 4 source addresses of 203.0.113.0/24)
# go to 198.51.100.10:9, addressed to the DUT's MAC. Each round measures, in turn:
#   noop   xdp_noop, held by `xdpgate-pktgen sink`: XDP_PASS, the DUT's stack drops the frame
#          (not its address, no forwarding)
#   allow  xdpgate with an NSG allowing the traffic: established flows, XDP_PASS, same drop
#   deny   xdpgate with an NSG denying it: every packet classified, dropped in XDP
# and reports, per case, the median over rounds of what pktgen sent per second and what the
# DUT took in per second (its veth's receive counter, which counts every frame its XDP
# program saw), with the ratio to the no-op.
#
# Environment:
#   COUNT=5000000      frames per measurement (per pktgen thread: COUNT / THREADS)
#   ROUNDS=3           rounds; medians are reported
#   THREADS=1          pktgen threads (kpktgend_0..N-1), one CPU each
#   DUT_CPU=           if set, the DUT's veth NAPI is threaded and pinned to this CPU;
#                      otherwise it runs in softirq on the sender's CPU
#   GENERATOR=kernel   kernel (pktgen), xdp (`xdpgate-pktgen`: live frames), or both
#   XDPGATE=<repo>/target/release/xdpgate
#   PKTGEN=<repo>/target/release/xdpgate-pktgen
#   OUT=<repo>/target/bench/pktgen-vm.md
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COUNT="${COUNT:-5000000}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-1}"
DUT_CPU="${DUT_CPU:-}"
GENERATOR="${GENERATOR:-kernel}"
XDPGATE="${XDPGATE:-$ROOT/target/release/xdpgate}"
PKTGEN="${PKTGEN:-$ROOT/target/release/xdpgate-pktgen}"
OUT="${OUT:-$ROOT/target/bench/pktgen-vm.md}"

GEN_NS=xgpb-gen
DUT_NS=xgpb-dut
GEN_IF=xgpb-gen
DUT_IF=xgpb-dut
PINS=/sys/fs/bpf/xgpb
DST=198.51.100.10
WORK="$(mktemp -d /tmp/xgpb.XXXXXX)"
SINK_PID=

die() { echo "pktgen-bench: $*" >&2; exit 1; }
log() { echo "pktgen-bench: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root"
[ -x "$XDPGATE" ] || die "no xdpgate binary at $XDPGATE (cargo build --release -p xdpgate)"
[ -x "$PKTGEN" ] || die "no xdpgate-pktgen binary at $PKTGEN (cargo build --release -p xdpgate-pktgen)"
case "$GENERATOR" in kernel | xdp | both) ;; *) die "GENERATOR is kernel, xdp or both" ;; esac
if [ "$GENERATOR" != xdp ]; then
  modprobe pktgen 2>/dev/null || die "no pktgen module in kernel $(uname -r): run" \
    "vagrant/provision.sh kernel and reboot, or GENERATOR=xdp"
fi

xg() { "$XDPGATE" --pin-dir "$PINS" --netns "$DUT_NS" "$@"; }

cleanup() {
  set +e
  stop_sink
  xg detach --all >/dev/null 2>&1
  rm -rf "$PINS" "/run/xdpgate/$(echo "${PINS#/}" | tr / _)" "$WORK"
  ip netns del "$GEN_NS" 2>/dev/null
  ip netns del "$DUT_NS" 2>/dev/null
}
trap cleanup EXIT

# --- topology -------------------------------------------------------------------------
ip netns del "$GEN_NS" 2>/dev/null || true
ip netns del "$DUT_NS" 2>/dev/null || true
for ns in "$GEN_NS" "$DUT_NS"; do
  ip netns add "$ns"
  # No IPv6 autoconfiguration chatter in the counters; the DUT does not forward.
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
    net.ipv6.conf.default.disable_ipv6=1 net.ipv4.ip_forward=0
  ip -n "$ns" link set lo up
done
ip link add "$GEN_IF" netns "$GEN_NS" type veth peer name "$DUT_IF" netns "$DUT_NS"
ip -n "$DUT_NS" addr add 203.0.113.254/24 dev "$DUT_IF"
ip -n "$GEN_NS" link set "$GEN_IF" up
ip -n "$DUT_NS" link set "$DUT_IF" up
DUT_MAC=$(ip netns exec "$DUT_NS" cat "/sys/class/net/$DUT_IF/address")

cat >"$WORK/allow.yaml" <<'EOF'
virtual_network:
  address_space: [198.51.100.0/24]
nsgs:
  - name: pps
    subnets: [198.51.100.0/24]
    rules:
      - {name: allow-gen, priority: 100, direction: inbound, access: allow, protocol: udp, source: [203.0.113.0/24], destination: ["*"], destination_ports: [9]}
EOF
sed 's/allow-gen/deny-gen/; s/access: allow/access: deny/' "$WORK/allow.yaml" >"$WORK/deny.yaml"

# --- the DUT's program ------------------------------------------------------------------
attached() { ip -n "$DUT_NS" link show "$DUT_IF" | grep -q prog/xdp; }

stop_sink() {
  if [ -n "$SINK_PID" ]; then
    kill -INT "$SINK_PID" 2>/dev/null
    wait "$SINK_PID" 2>/dev/null
    SINK_PID=
  fi
}

attach() { # noop | allow | deny
  case "$1" in
    noop)
      "$PKTGEN" --netns "$DUT_NS" sink --iface "$DUT_IF" >/dev/null 2>&1 &
      SINK_PID=$!
      for _ in $(seq 500); do attached && break; sleep 0.02; done
      attached || die "the sink did not attach xdp_noop"
      ;;
    allow | deny)
      xg attach --iface "$DUT_IF" --role external >/dev/null
      xg apply "$WORK/$1.yaml" >/dev/null
      ;;
  esac
  # A veth has NAPI only while XDP is attached: place it now.
  if [ -n "$DUT_CPU" ]; then
    ip netns exec "$DUT_NS" sh -c "echo 1 > /sys/class/net/$DUT_IF/threaded"
    for p in /proc/[0-9]*; do
      case "$(cat "$p/comm" 2>/dev/null)" in "napi/$DUT_IF-"*) taskset -pc "$DUT_CPU" "${p#/proc/}" >/dev/null ;; esac
    done
  else
    ip netns exec "$DUT_NS" sh -c "echo 0 > /sys/class/net/$DUT_IF/threaded" 2>/dev/null || true
  fi
}

detach() {
  if [ "$1" = noop ]; then stop_sink; else xg detach --iface "$DUT_IF" >/dev/null; fi
}

# Received packets of the DUT's veth (a long counter leaves no space after the colon).
dut_rx() { ip netns exec "$DUT_NS" awk -v d="$DUT_IF" '{ sub(/:/, " ") } $1 == d { print $3 }' /proc/net/dev; }

# --- generators: each prints "<sent pps> <seconds>" -------------------------------------
pg() { # FILE COMMAND: one pktgen command; pktgen refuses a bad one by failing the write
  ip netns exec "$GEN_NS" sh -c "echo '$2' > /proc/net/pktgen/$1" ||
    die "pktgen $1: '$2' refused: $(ip netns exec "$GEN_NS" grep Result: "/proc/net/pktgen/$1")"
}

kernel_pktgen() { # COUNT
  local per=$(($1 / THREADS)) t dev
  for t in $(seq 0 $((THREADS - 1))); do
    dev="$GEN_IF@$t"
    pg "kpktgend_$t" rem_device_all
    pg "kpktgend_$t" "add_device $dev"
    for c in "count $per" "clone_skb 0" "pkt_size 60" "delay 0" "dst $DST" "dst_mac $DUT_MAC" \
      "src_min 203.0.113.1" "src_max 203.0.113.4" "udp_src_min 10000" "udp_src_max 10063" \
      "udp_dst_min 9" "udp_dst_max 9"; do
      pg "$dev" "$c"
    done
  done
  # Blocks until every thread has sent its count.
  ip netns exec "$GEN_NS" sh -c 'echo start > /proc/net/pktgen/pgctrl'
  local pps=0 usec=0 line
  for t in $(seq 0 $((THREADS - 1))); do
    line=$(ip netns exec "$GEN_NS" cat "/proc/net/pktgen/$GEN_IF@$t")
    pps=$((pps + $(echo "$line" | sed -n '/Result: OK/,$p' | grep -o '[0-9]*pps' | head -n 1 | sed 's/pps//')))
    local u
    u=$(echo "$line" | sed -n 's/.*Result: OK: \([0-9]*\)(.*/\1/p' | head -n 1)
    [ "$u" -gt "$usec" ] && usec=$u
    pg "kpktgend_$t" rem_device_all
  done
  echo "$pps $(awk -v u="$usec" 'BEGIN { printf "%.6f", u / 1e6 }')"
}

xdp_pktgen() { # COUNT
  local json
  json=$("$PKTGEN" --netns "$GEN_NS" --iface "$GEN_IF" --count "$1" --dst-mac "$DUT_MAC" \
    --src 203.0.113.1-203.0.113.4 --sport 10000-10063 --flows 256 --dst "$DST" --dport 9 --via live --json)
  local submitted seconds
  submitted=$(echo "$json" | sed -n 's/.*"submitted": \([0-9]*\).*/\1/p')
  seconds=$(echo "$json" | sed -n 's/.*"seconds": \([0-9.e-]*\).*/\1/p')
  echo "$(awk -v n="$submitted" -v s="$seconds" 'BEGIN { printf "%.0f", n / s }') $seconds"
}

# Appends "sent_pps taken_pps" of one measurement to $WORK/GENERATOR-CASE. Runs in this
# shell (not a subshell) so that the exit trap knows the sink's pid.
measure() { # GENERATOR CASE
  local gen=$1 case=$2 before after result
  attach "$case"
  # Warm-up: opens the flows of the allow case, warms caches.
  "${gen}_pktgen" 100000 >/dev/null
  before=$(dut_rx)
  result=$("${gen}_pktgen" "$COUNT")
  after=$(dut_rx)
  detach "$case"
  local sent secs taken
  read -r sent secs <<<"$result"
  taken=$(awk -v n=$((after - before)) -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
  log "  sent $sent pps, DUT took in $taken pps"
  echo "$sent $taken" >>"$WORK/$gen-$case"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- run --------------------------------------------------------------------------------
gens=("$GENERATOR")
[ "$GENERATOR" = both ] && gens=(kernel xdp)
cases=(noop allow deny)
for round in $(seq "$ROUNDS"); do
  order=("${cases[@]}")
  [ $((round % 2)) = 0 ] && order=(deny allow noop)
  for gen in "${gens[@]}"; do
    for case in "${order[@]}"; do
      log "round $round/$ROUNDS, $gen generator, $case ..."
      measure "$gen" "$case"
    done
  done
done

mkdir -p "$(dirname "$OUT")"
napi="softirq on the sender's CPU"
[ -n "$DUT_CPU" ] && napi="threaded, on CPU $DUT_CPU"
{
  echo "### pktgen against xdpgate over veth ($(uname -r), $(nproc) CPUs)"
  echo
  echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u '+%Y-%m-%d %H:%M UTC'), $COUNT frames per measurement, median of $ROUNDS rounds, pktgen threads: $THREADS, DUT NAPI: $napi."
  echo
  echo "| generator | program on the DUT's veth | verdict | Mpps sent | Mpps taken in | ratio to no-op (taken in) |"
  echo "|---|---|---|---:|---:|---:|"
  for gen in "${gens[@]}"; do
    base=$(cut -d' ' -f2 "$WORK/$gen-noop" | median)
    for case in "${cases[@]}"; do
      sent=$(cut -d' ' -f1 "$WORK/$gen-$case" | median)
      taken=$(cut -d' ' -f2 "$WORK/$gen-$case" | median)
      case $case in
        noop) what="xdp_noop (baseline)"; verdict="pass: DUT stack drops it" ;;
        allow) what="xdpgate, NSG allows"; verdict="pass: DUT stack drops it" ;;
        deny) what="xdpgate, NSG denies"; verdict="drop in XDP" ;;
      esac
      label=$([ "$gen" = kernel ] && echo "kernel pktgen" || echo "xdpgate-pktgen (live frames)")
      awk -v g="$label" -v w="$what" -v v="$verdict" -v s="$sent" -v t="$taken" -v b="$base" \
        'BEGIN { printf "| %s | %s | %s | %.3f | %.3f | %.2f |\n", g, w, v, s / 1e6, t / 1e6, t / b }'
    done
  done
  echo
  echo "Sent: pktgen's own figure (frames handed to the veth; a veth whose peer ring is full drops and still reports success). Taken in: the DUT veth's receive counter over the generator's run time."
} | tee "$OUT"
log "wrote $OUT"
