#!/usr/bin/env bash
# The xdpgate demo: an "internet" client, a gateway running xdpgate, and a web subnet of
# three servers on a bridge, each in its own network namespace:
#
#   [xg-inet] 203.0.113.10 --- ext0 [xg-gw] int0 --- [xg-lan bridge] --- web1 198.51.100.11
#                              203.0.113.1   198.51.100.1             --- web2 198.51.100.12
#                                                                     --- web3 198.51.100.13
#   load-balanced frontend 192.0.2.10:80, NAT pool address 192.0.2.100
#
# Everything is removed on exit, even on failure.
set -euo pipefail
XDPGATE=${1:?usage: demo.sh PATH_TO_XDPGATE [POLICY]}
POLICY=${2:-$(dirname "$0")/../policies/demo.yaml}
PINS=/sys/fs/bpf/xdpgate-demo
NS=(xg-inet xg-gw xg-lan xg-web1 xg-web2 xg-web3)
WORK=$(mktemp -d)
AGENT=""

cleanup() {
  [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
  "$XDPGATE" --netns xg-gw --pin-dir $PINS detach --all >/dev/null 2>&1 || true
  rm -rf $PINS "$WORK" /run/xdpgate/sys_fs_bpf_xdpgate-demo
  for ns in "${NS[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT
cleanup

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
xg() { "$XDPGATE" --netns xg-gw --pin-dir $PINS "$@"; }
get() { nsx xg-inet curl -s --max-time 2 "$@" || echo "(no answer: dropped)"; }

step "Topology: internet client -> xdpgate gateway -> web subnet of three servers"
for ns in "${NS[@]}"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
ip link add ext0 netns xg-gw type veth peer name eth0 netns xg-inet
ip link add int0 netns xg-gw type veth peer name p0 netns xg-lan
nsx xg-lan ip link add br0 type bridge
nsx xg-lan ip link set p0 master br0
for i in 1 2 3; do
  ip link add eth0 netns xg-web$i type veth peer name p$i netns xg-lan
  nsx xg-lan ip link set p$i master br0
  nsx xg-lan ip link set p$i up
  nsx xg-web$i ip addr add 198.51.100.1$i/24 dev eth0
  nsx xg-web$i ip link set eth0 up
  nsx xg-web$i ip route add default via 198.51.100.1
done
nsx xg-lan ip link set br0 up
nsx xg-lan ip link set p0 up
nsx xg-inet ip addr add 203.0.113.10/24 dev eth0
nsx xg-gw ip addr add 203.0.113.1/24 dev ext0
nsx xg-gw ip addr add 198.51.100.1/24 dev int0
for l in "xg-inet eth0" "xg-gw ext0" "xg-gw int0"; do set -- $l; nsx "$1" ip link set "$2" up; done
nsx xg-inet ip route add default via 203.0.113.1
nsx xg-gw sysctl -qw net.ipv4.ip_forward=1
step "Web servers: each answers with its name on :8080; an internet server on :8000"
for i in 1 2 3; do
  mkdir -p "$WORK/web$i" && echo "web$i" > "$WORK/web$i/index.html"
  nsx xg-web$i python3 -m http.server 8080 --bind 198.51.100.1$i --directory "$WORK/web$i" >/dev/null 2>&1 &
done
mkdir -p "$WORK/inet" && echo "hello from the internet" > "$WORK/inet/index.html"
nsx xg-inet python3 -m http.server 8000 --bind 203.0.113.10 --directory "$WORK/inet" 2>"$WORK/inet.log" &
sleep 1

step "Attach xdpgate to both gateway interfaces (veth: the tc hook, its default); start the agent"
xg attach --iface ext0 --role external
xg attach --iface int0 --role internal
"$XDPGATE" check "$POLICY"
"$XDPGATE" --netns xg-gw --pin-dir $PINS run --policy "$POLICY" 2>"$WORK/agent.log" &
AGENT=$!
for _ in $(seq 50); do xg lb >/dev/null 2>&1 && break; sleep 0.1; done
sleep 1

step "Ask before sending: would these flows be allowed, and by which rule?"
for args in "inbound tcp --local 198.51.100.11:8080 --remote 203.0.113.10:40000" \
            "inbound tcp --local 198.51.100.11:22 --remote 203.0.113.10:40000" \
            "outbound tcp --local 198.51.100.11:40000 --remote 203.0.113.10:25"; do
  set -- $args
  echo "$args:"
  # Exit status 1 means denied, which is an answer here.
  { xg verify-flow --direction "$1" --protocol "$2" "${@:3}" || [ $? -eq 1 ]; } | sed 's/^/  /'
done

step "Load balancing: six requests to the frontend 192.0.2.10:80"
for _ in $(seq 6); do printf '%s ' "$(get http://192.0.2.10/)"; done; echo
printf 'inbound NAT rule, 192.0.2.10:8001 -> web1: '; get http://192.0.2.10:8001/

step "Filtering: the servers themselves are reachable only on 8080"
printf 'TCP 22 on web1 (DenyAllInBound): '; get http://198.51.100.11:22/
printf 'ping web1 (no ICMP rule):        '
nsx xg-inet ping -c 2 -i 0.2 -W 1 198.51.100.11 | grep -oE '[0-9]+ received' || true

step "NAT gateway: web1 fetches from the internet; the server logs the pool address"
nsx xg-web1 curl -s --max-time 3 http://203.0.113.10:8000/
sleep 0.2; grep -oE '^[0-9.]+ .*"GET / HTTP/1.1" 200' "$WORK/inet.log" | tail -1

step "Health: web2 stops; the probe takes it out and new requests avoid it"
ip netns pids xg-web2 | xargs -r kill
for _ in $(seq 40); do xg lb | grep -q 'UNHEALTHY' && break; sleep 0.1; done
grep -m1 unhealthy "$WORK/agent.log" | sed 's/^/agent: /'
for _ in $(seq 6); do printf '%s ' "$(get http://192.0.2.10/)"; done; echo

step "What the operator sees (read from the pinned maps by separate invocations)"
xg lb
xg nat
xg stats | awk '/RULE HITS/{p=1} !p || $NF > 0 || /NSG|RULE HITS/'

step "Detach"
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true; AGENT=""
xg detach --all
