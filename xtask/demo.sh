#!/usr/bin/env bash
# The xdpgate demo: an "internet" client, a gateway running xdpgate and a protected subnet
# with a web server, each in its own network namespace, joined by veth pairs:
#
#   [xg-inet] 203.0.113.10 --- 203.0.113.1 [xg-gw] 198.51.100.1 --- 198.51.100.10 [xg-web]
#                              (external)          (internal)
#
# Everything is removed on exit, even on failure.
set -euo pipefail
XDPGATE=${1:?usage: demo.sh PATH_TO_XDPGATE}
POLICY=${2:-$(dirname "$0")/../policies/example.yaml}
PINS=/sys/fs/bpf/xdpgate-demo
NS=(xg-inet xg-gw xg-web)

cleanup() {
  "$XDPGATE" --netns xg-gw --pin-dir $PINS detach --all >/dev/null 2>&1 || true
  rm -rf $PINS
  for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

step "Topology: internet client -> xdpgate gateway -> web subnet"
for ns in "${NS[@]}"; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
ip link add ext0 netns xg-gw type veth peer name eth0 netns xg-inet
ip link add int0 netns xg-gw type veth peer name eth0 netns xg-web
nsx xg-inet ip addr add 203.0.113.10/24 dev eth0
nsx xg-gw   ip addr add 203.0.113.1/24 dev ext0
nsx xg-gw   ip addr add 198.51.100.1/24 dev int0
nsx xg-web  ip addr add 198.51.100.10/24 dev eth0
for l in "xg-inet eth0" "xg-gw ext0" "xg-gw int0" "xg-web eth0"; do set -- $l; nsx "$1" ip link set "$2" up; done
nsx xg-inet ip route add default via 203.0.113.1
nsx xg-web  ip route add default via 198.51.100.1
nsx xg-gw   sysctl -qw net.ipv4.ip_forward=1

step "Attach xdpgate (native XDP) to both gateway interfaces"
"$XDPGATE" --netns xg-gw --pin-dir $PINS attach --iface ext0 --role external
"$XDPGATE" --netns xg-gw --pin-dir $PINS attach --iface int0 --role internal
for i in ext0 int0; do echo "$i: $(nsx xg-gw ip -d link show dev $i | grep -o 'prog/xdp id [0-9]* name [a-z_]*')"; done

step "A web server in the subnet; before any policy, everything passes"
nsx xg-web python3 -m http.server 80 --bind 198.51.100.10 --directory /usr/share/doc >/dev/null 2>&1 &
WEB=$!
trap 'kill $WEB 2>/dev/null; cleanup' EXIT
for _ in $(seq 50); do nsx xg-inet curl -s -o /dev/null http://198.51.100.10/ && break; sleep 0.1; done
nsx xg-inet ping -c 1 -W 1 198.51.100.10 | grep -E 'received'

step "Apply the example policy ($POLICY)"
"$XDPGATE" check "$POLICY"
"$XDPGATE" --netns xg-gw --pin-dir $PINS apply "$POLICY"

step "Ask before sending: would these flows be allowed, and by which rule?"
for args in "tcp --local 198.51.100.10:80 --remote 203.0.113.10:40000" \
            "icmp --local 198.51.100.10 --remote 203.0.113.10" \
            "tcp --local 198.51.100.10:22 --remote 203.0.113.10:40000"; do
  set -- $args
  echo "inbound $args:"
  "$XDPGATE" --pin-dir $PINS verify-flow --direction inbound --protocol "$@" | sed 's/^/  /'
done

step "Real traffic through the gateway"
printf 'HTTP to port 80 (allow-web, allow-http):  '
nsx xg-inet curl -s -o /dev/null -w 'HTTP %{http_code}, %{size_download} bytes\n' http://198.51.100.10/
printf 'TCP to port 22 (DenyAllInBound):           '
nsx xg-inet curl -s -o /dev/null --max-time 2 http://198.51.100.10:22/ && echo "connected (unexpected)" || echo "no answer: dropped"
printf 'ping (host NSG has no ICMP rule):          '
nsx xg-inet ping -c 2 -i 0.2 -W 1 198.51.100.10 | grep -oE '[0-9]+ received' || true
printf 'server pings the internet (deny-internet-out): '
nsx xg-web ping -c 2 -i 0.2 -W 1 203.0.113.10 | grep -oE '[0-9]+ received' || true
echo "(the web server's replies to the client still pass: NSGs are stateful)"

step "Counters and rule hits, read back from the pinned maps by a separate invocation"
"$XDPGATE" --netns xg-gw --pin-dir $PINS stats | awk '/RULE HITS/{p=1} !p || $NF > 0 || /NSG|RULE HITS/'

step "Detach"
"$XDPGATE" --netns xg-gw --pin-dir $PINS detach --all
