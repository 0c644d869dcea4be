#!/bin/sh
# xdpgate-backend.sh: make this host a backend of xdpgate's encapsulating load balancer.
#
# The gateways send each client packet to a backend inside one more IP header (IPv4 in IPv4,
# protocol 4, for IPv4 frontends; IPv6 in IPv6, next header 41, for IPv6 ones), addressed
# to the backend. The backend strips that header, accepts the inner packet (addressed to
# the frontend) as its own, and answers the client directly from the frontend address.
# Only IP-in-IP from the gateways' outer sources (--gateway) is accepted: from anyone else
# it would pass by the gateways' policy.
# `up` sets that up; `down` undoes it. Both are idempotent. See README, "Backends".
set -eu

usage() {
	cat >&2 <<'USAGE'
usage: xdpgate-backend.sh up|down [options] FRONTEND...

  up --gateway ADDR... FRONTEND...
                    serve these frontend addresses (adds to those already served) to the
                    gateways whose IP-in-IP comes from these sources
  down [FRONTEND...] stop serving these (all when none is named); with none left, undo
                    everything up did
  down --gateway ADDR... [FRONTEND...]
                    stop accepting IP-in-IP from these gateways (as up was given them;
                    at least one must be left), and only then the frontends named

options:
  --gateway ADDR|PREFIX   up: an outer source address (or prefix) of the gateways' IP-in-IP,
                          their `encapsulation:` source; repeat for more (added to those of
                          earlier `up`s; required on the first). 0.0.0.0/0 and ::/0 trust
                          any host. xdpgate decap decapsulates from these only; both decap
                          modes add an nftables rule dropping IP-in-IP from anyone else
                          (required with --decap kernel; skipped with a warning, if nft is
                          missing, with --decap xdpgate, whose program is the filter).
                          down: a gateway to remove, as up was given it
  --decap kernel|xdpgate  how to decapsulate: the kernel's collect-metadata tunnel devices
                          (xdpgate4: ipip, xdpgate6: ip6tnl), or xdpgate's XDP program
                          (`xdpgate decap attach`). Default: kernel if this kernel can
                          create those devices, else xdpgate.
  --interface IF          xdpgate decap: the interface the encapsulated packets arrive by,
                          untagged: a VLAN's device, not its parent (default: the
                          interface of the default route)
  --hook xdp|tc           xdpgate decap: XDP (default: per frame, before the kernel makes
                          a socket buffer) or tc ingress (per socket buffer, after GRO)
  --mode native|skb       xdpgate decap at XDP: the mode (default native)
  --netns NS              do it all in network namespace NS (do not wrap this script in
                          `ip netns exec`, which hides the pins in /sys/fs/bpf)
  --pin-dir DIR           xdpgate's pin directory (default: xdpgate's own)
  --path-mtu N            the MTU of the path from the gateways (default 1500): the TCP MSS
                          advertised to clients is lowered by the outer header so that the
                          encapsulated packets fit it
  --no-mss                leave the routes' advmss alone

environment: XDPGATE, the xdpgate binary (default: xdpgate in PATH)
USAGE
	exit 2
}

die() {
	echo "xdpgate-backend.sh: $*" >&2
	exit 1
}

XDPGATE=${XDPGATE:-xdpgate}
action=
decap=
iface=
hook=xdp
mode=
netns=
pin_dir=
path_mtu=1500
mss=yes
frontends=
gateways=

[ $# -gt 0 ] || usage
case $1 in
up | down) action=$1 ;;
-h | --help) usage ;;
*) echo "xdpgate-backend.sh: unknown action '$1' (up or down)" >&2 && usage ;;
esac
shift
need_value() {
	[ $# -ge 2 ] || die "$1 needs a value"
}
# Addresses in lower case, as xdpgate writes them: `2001:DB8::10` and `2001:db8::10` are one
# frontend to `down` (other spellings, `2001:db8:0::10`, still are not: `down` one as `up`
# was given it).
lower() {
	printf '%s\n' "$1" | tr 'A-F' 'a-f'
}
while [ $# -gt 0 ]; do
	case $1 in
	--decap)
		need_value "$@"
		case $2 in kernel | xdpgate) decap=$2 ;; *) die "--decap: '$2' is not kernel or xdpgate" ;; esac
		shift 2
		;;
	--gateway)
		need_value "$@"
		gateways="$gateways $(lower "$2")"
		shift 2
		;;
	--interface)
		need_value "$@"
		iface=$2
		shift 2
		;;
	--hook)
		need_value "$@"
		case $2 in xdp | tc) hook=$2 ;; *) die "--hook: '$2' is not xdp or tc" ;; esac
		shift 2
		;;
	--mode)
		need_value "$@"
		case $2 in native | skb) mode=$2 ;; *) die "--mode: '$2' is not native or skb" ;; esac
		shift 2
		;;
	--netns)
		need_value "$@"
		netns=$2
		shift 2
		;;
	--pin-dir)
		need_value "$@"
		# One directory, one state, however it is spelt (a trailing slash, a relative path).
		pin_dir=$(realpath -m -- "$2")
		shift 2
		;;
	--path-mtu)
		need_value "$@"
		case $2 in '' | *[!0-9]*) die "--path-mtu: '$2' is not a number" ;; esac
		[ "$2" -ge 1280 ] && [ "$2" -le 65535 ] || die "--path-mtu: $2 is not within 1280..65535"
		path_mtu=$2
		shift 2
		;;
	--no-mss)
		mss=no
		shift
		;;
	-h | --help) usage ;;
	-*) die "unknown option '$1'" ;;
	*)
		frontends="$frontends $(lower "$1")"
		shift
		;;
	esac
done

if [ "$hook" = tc ] && [ -n "$mode" ]; then
	die "--mode applies to XDP only: leave it out with --hook tc"
fi

# An address's family (4 or 6); refuses what is neither, before anything is changed.
family() {
	case $1 in
	*/*) die "'$1': give a frontend address, without a prefix length" ;;
	*:*)
		case $1 in *[!0-9a-fA-F:.]*) die "'$1' is not an IPv6 address" ;; esac
		echo 6
		;;
	*.*.*.*)
		case $1 in *[!0-9.]* | *..* | .* | *.) die "'$1' is not an IPv4 address" ;; esac
		old_ifs=$IFS
		IFS=.
		# shellcheck disable=SC2086
		set -- $1
		IFS=$old_ifs
		[ $# -eq 4 ] || die "'$*' is not an IPv4 address"
		for octet in "$@"; do
			[ "$octet" -le 255 ] || die "'$1.$2.$3.$4' is not an IPv4 address"
		done
		echo 4
		;;
	*) die "'$1' is not an IP address" ;;
	esac
}

ipc() {
	if [ -n "$netns" ]; then ip -n "$netns" "$@"; else ip "$@"; fi
}

in_ns() {
	if [ -n "$netns" ]; then ip netns exec "$netns" "$@"; else "$@"; fi
}

xg() {
	if [ -n "$pin_dir" ]; then set -- --pin-dir "$pin_dir" "$@"; fi
	if [ -n "$netns" ]; then set -- --netns "$netns" "$@"; fi
	"$XDPGATE" "$@"
}

sysctl_get() {
	in_ns cat "/proc/sys/net/ipv4/conf/$1/rp_filter"
}

sysctl_set() {
	in_ns sh -c 'echo "$1" > "/proc/sys/net/ipv4/conf/$2/rp_filter"' sh "$2" "$1"
}

# A namespace name names a file in /run/netns and a state directory here: never a path
# (`down --netns ../../etc` would otherwise remove /etc with the state).
case $netns in
. | .. | */*) die "'$netns' is not a network namespace name" ;;
esac

# What up did, to be undone by down: per namespace.
state=/run/xdpgate-backend/${netns:-host}
if [ -n "$pin_dir" ]; then
	state=$state$(echo "$pin_dir" | tr / _)
fi

# A namespace's identity: a namespace deleted and created again under its name is another.
netns_id() {
	stat -L -c %d:%i "/run/netns/$1" 2>/dev/null || true
}

# Detaches the decap program a dead namespace's state $1 recorded, pins and all: bpffs
# outlives the namespace, and one created again under its name would otherwise be given its
# frontends and gateways by its first `up`.
forget_pins() {
	[ "$(cat "$1/decap" 2>/dev/null || true)" = xdpgate ] && [ -e "$1/pin_dir" ] || return 0
	if [ -n "$(cat "$1/pin_dir")" ]; then set -- --pin-dir "$(cat "$1/pin_dir")"; else set --; fi
	"$XDPGATE" "$@" decap detach --all >/dev/null ||
		echo "xdpgate-backend.sh: could not detach a deleted namespace's decap program" >&2
}

# One run at a time on a host (units for several namespaces start at once): each cleans up
# the state of every namespace below, and would remove what another run is writing. The
# lock goes with this shell; nothing this script starts outlives it.
mkdir -p /run/xdpgate-backend
exec 9>/run/xdpgate-backend/.lock
flock -E 75 -w 60 9 || {
	[ $? -eq 75 ] && die "another xdpgate-backend.sh has run for 60 s; nothing was changed"
	die "could not lock /run/xdpgate-backend/.lock (flock, from util-linux); nothing was changed"
}

# The state of namespaces deleted since (with all up did in them) is of no use any more,
# nor is that of a namespace whose name a new one took.
for saved in /run/xdpgate-backend/*/netns; do
	[ -e "$saved" ] || continue
	dir=${saved%/netns}
	id=$(netns_id "$(cat "$saved")")
	if [ -z "$id" ] || { [ -e "$dir/netns_id" ] && [ "$(cat "$dir/netns_id")" != "$id" ]; }; then
		forget_pins "$dir"
		rm -rf "$dir"
	fi
done

# Refuses an address no client sends to, as `xdpgate decap attach` does: loopback,
# unspecified, multicast, broadcast, or IPv4-mapped (packets to it carry the IPv4 address).
frontend_check() {
	case $1 in
	127.* | 0.0.0.0 | 22[4-9].* | 23[0-9].* | 255.255.255.255 | :: | ::1 | [fF][fF]* | ::[fF][fF][fF][fF]:*)
		die "'$1' is not a frontend: a loopback, unspecified, multicast, broadcast or" \
			"IPv4-mapped address"
		;;
	esac
}

# A gateway's address or prefix: an address (the family() checks) and a length within it.
gateway_family() {
	fam=$(family "${1%%/*}")
	case $1 in
	*/*)
		len=${1#*/}
		case $len in '' | *[!0-9]*) die "--gateway: '$1' has no prefix length after /" ;; esac
		if [ "$fam" = 4 ]; then max=32; else max=128; fi
		[ "$len" -le "$max" ] || die "--gateway: '$1': a prefix length is at most $max"
		;;
	esac
	echo "$fam"
}

# Checked before anything changes.
for f in $frontends; do
	family "$f" >/dev/null
	frontend_check "$f"
done
for g in $gateways; do
	gateway_family "$g" >/dev/null
done
if [ -n "$netns" ] && [ ! -e "/run/netns/$netns" ]; then
	die "no network namespace named '$netns'"
fi

# The interface of the IPv4 (else IPv6) default route.
default_iface() {
	for fam in 4 6; do
		dev=$(ipc -"$fam" route show default | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)
		if [ -n "$dev" ]; then
			echo "$dev"
			return
		fi
	done
}

# Whether this kernel has the collect-metadata tunnel device of `kind` (ipip or ip6tnl).
kernel_has() {
	if [ "$1" = ipip ]; then args="type ipip external"; else args="type ip6tnl mode any external"; fi
	# shellcheck disable=SC2086
	ipc link add xdpgate-probe $args 2>/dev/null || return 1
	ipc link del xdpgate-probe
}

# A route as `ip route change` takes it back: without the flags `ip route show` adds.
route_args() {
	sed -e 's/ linkdown//g' -e 's/ dead//g' -e 's/ rt_offload_failed//g' -e 's/ rt_offload//g' \
		-e 's/ rt_trap//g' -e 's/ offload//g' -e 's/ trap//g'
}

# The default route of family $1 when one `ip route change` can change it and give it
# back: not a multipath route, one of several, nor one from a router advertisement (whose
# timer the next advertisement replaces anyway).
changeable_default() {
	route=$(ipc -"$1" route show default)
	case $route in
	'' | *"
"* | *nexthop* | *" expires "*) return 1 ;;
	esac
	echo "$route"
}

# The advmss of route $1, if it has one.
advmss_of() {
	echo "$1" | sed -n 's/.* advmss \([0-9]*\).*/\1/p'
}

# Changes route $2 of family $1 to have advmss $3, or none when that is empty.
set_advmss() {
	set -f
	# shellcheck disable=SC2046
	ipc -"$1" route change $(echo "$2" | route_args | sed 's/ advmss [0-9]*//') ${3:+advmss "$3"}
	set +f
}

# A state of an earlier version saved the whole route at the first `up`: its advmss was
# the route's own, and the one on the route now is up's.
legacy_route_state() {
	[ -e "$state/route$1" ] || return 0
	advmss_of "$(cat "$state/route$1")" >"$state/advmss$1"
	advmss_of "$(ipc -"$1" route show default)" >"$state/advmss$1.set"
	rm -f "$state/route$1"
}

# Lowers the MSS this host advertises to clients reached by the default route of family $1
# (the replies to clients leave by it): the gateways add a 20-byte (IPv4) or 40-byte (IPv6)
# header to every client packet, which must still fit the path MTU; a client sending full
# segments of the usual MSS would otherwise see them dropped (or, with DF, get "fragmentation
# needed" from a gateway). A lower advmss on the route is kept. Only the advmss is up's:
# each `up` changes the route as it is then (its gateway may have changed since), and
# remembers the route's own advmss for down.
lower_mss() {
	fam=$1
	legacy_route_state "$fam"
	if [ -z "$(ipc -"$fam" route show default)" ]; then
		echo "xdpgate-backend.sh: no IPv$fam default route: set 'advmss' on the routes" \
			"to your IPv$fam clients yourself" >&2
		return
	fi
	if ! route=$(changeable_default "$fam"); then
		echo "xdpgate-backend.sh: the IPv$fam default route is multipath, one of several or" \
			"from a router advertisement: left as it is; set 'advmss' on the routes to your" \
			"IPv$fam clients yourself:" "$(ipc -"$fam" route show default)" >&2
		return
	fi
	if [ "$fam" = 4 ]; then advmss=$((path_mtu - 20 - 20 - 20)); else advmss=$((path_mtu - 40 - 40 - 20)); fi
	have=$(advmss_of "$route")
	# A lower one, the operator's or an earlier `up`'s, is stricter still: kept.
	if [ -n "$have" ] && [ "$have" -le "$advmss" ]; then return; fi
	ours=$(cat "$state/advmss$fam.set" 2>/dev/null || true)
	if [ -z "$ours" ] || [ "$have" != "$ours" ]; then echo "$have" >"$state/advmss$fam"; fi
	set_advmss "$fam" "$route" "$advmss"
	echo "$advmss" >"$state/advmss$fam.set"
}

# Gives the default route of family $1 its own advmss back, if it still has the one up set
# (one set by the operator since is theirs), leaving the rest of it as it is now.
restore_mss() {
	fam=$1
	legacy_route_state "$fam"
	[ -e "$state/advmss$fam.set" ] || return 0
	ours=$(cat "$state/advmss$fam.set")
	if route=$(changeable_default "$fam") && [ "$(advmss_of "$route")" = "$ours" ]; then
		set_advmss "$fam" "$route" "$(cat "$state/advmss$fam")"
	else
		echo "xdpgate-backend.sh: the IPv$fam default route no longer has the advmss $ours" \
			"up set: left as it is" >&2
	fi
	rm -f "$state/advmss$fam" "$state/advmss$fam.set"
}

# Refuses, for $1 (up or down), frontends $2 of a family no gateway in $3 is of: the
# gateways encapsulate an IPv4 frontend's packets in IPv4 and an IPv6 one's in IPv6, which
# the backend would drop as from no gateway while the gateways' plain health probes pass,
# keeping it in their tables. $4: what to do instead.
need_gateway_families() {
	for fam in $(for f in $2; do family "$f"; done | sort -u); do
		for g in $3; do
			[ "$(gateway_family "$g")" != "$fam" ] || continue 2
		done
		of=$(for f in $2; do if [ "$(family "$f")" = "$fam" ]; then echo "$f"; fi; done |
			sort -u | paste -s -d' ' -)
		die "$1: no IPv$fam gateway for the IPv$fam frontends ($of): their IP-in-IP comes" \
			"from IPv$fam gateways; $4; nothing was changed"
	done
}

# The gateways of family $1 (4 or 6), saved and given, comma-separated.
gateways_of() {
	for g in $gateways; do
		[ "$(gateway_family "$g")" = "$1" ] && printf '%s\n' "$g"
	done | paste -s -d, -
}

# An nftables table dropping IP-in-IP (protocol 4 or 41) from anyone but the gateways: the
# kernel's collect-metadata tunnel devices accept it from any source, to any local address.
restrict_tunnels() {
	e4= e6=
	g4=$(gateways_of 4)
	g6=$(gateways_of 6)
	[ -z "$g4" ] || e4="elements = { $g4 }"
	[ -z "$g6" ] || e6="elements = { $g6 }"
	in_ns nft -f - <<NFT
table inet $NFT_TABLE
delete table inet $NFT_TABLE
table inet $NFT_TABLE {
	set gateways4 {
		type ipv4_addr; flags interval; auto-merge
		$e4
	}
	set gateways6 {
		type ipv6_addr; flags interval; auto-merge
		$e6
	}
	chain input {
		type filter hook input priority filter; policy accept;
		meta nfproto ipv4 meta l4proto { 4, 41 } ip saddr != @gateways4 counter drop
		meta nfproto ipv6 meta l4proto { 4, 41 } ip6 saddr != @gateways6 counter drop
	}
}
NFT
	touch "$state/nft"
}

# Loosens reverse-path filtering on $1 (remembering its setting once): the decapsulated
# packet comes from a client anywhere, and arrives by the tunnel device (kernel decap),
# which no route to a client uses, or by the interface the gateways reach (xdpgate decap),
# which the route to a client need not use. Strict mode (1) drops it; loose mode (2) only
# wants some route back. (rp_filter is the larger of `all` and the device's: setting the
# device to 2 is enough whatever `all` says. IPv6 has no rp_filter.)
loosen_rp_filter() {
	[ -e "$state/rp_filter.$1" ] || sysctl_get "$1" >"$state/rp_filter.$1"
	sysctl_set "$1" 2
}

restore_rp_filter() {
	for saved in "$state"/rp_filter.*; do
		[ -e "$saved" ] || continue
		dev=${saved##*/rp_filter.}
		if ipc link show dev "$dev" >/dev/null 2>&1; then
			sysctl_set "$dev" "$(cat "$saved")"
		fi
		rm -f "$saved"
	done
}

NFT_TABLE=xdpgate_backend

families() {
	for f in $frontends; do family "$f"; done | sort -u
}

served() {
	[ -e "$state/frontends" ] && cat "$state/frontends"
	return 0
}

# Removes line $2 from state file $1.
forget() {
	grep -vxF "$2" "$state/$1" >"$state/$1.new" || true
	mv "$state/$1.new" "$state/$1"
}

# The frontend addresses up added to lo, the only ones down deletes (an address there
# before is someone else's). A state of an earlier version did not say: its frontends.
added_list() {
	[ -e "$state/added" ] || served >"$state/added"
}

# How to run xdpgate as this script does, for a message.
xdpgate_command() {
	echo "xdpgate${netns:+ --netns $netns}${pin_dir:+ --pin-dir $pin_dir} $*"
}

# Refuses, for $1 (up or down), xdpgate's decap program under this pin directory when this
# script has no record of it (attached by hand, or the record lost): up would add to
# frontends and gateways it was never given, and down would leave it, saying nothing was
# served.
refuse_unrecorded_program() {
	command -v "$XDPGATE" >/dev/null 2>&1 || return 0
	status=$(xg decap status 2>/dev/null) || return 0
	case $status in "the decap program is attached to no interface"*) return 0 ;; esac
	die "$1: this script did not set up (or lost its record of) xdpgate's decap program in" \
		"${netns:-this host} under ${pin_dir:-the default pin directory}: left as it is" \
		"(\`$(xdpgate_command decap detach --all)\` removes it); nothing was changed:
$status"
}

# `down` with no record for this namespace and pin directory: the namespace's record under
# another pin directory is named (a `down` given another --pin-dir than `up`), and so is a
# program this script did not set up; with neither, there is nothing to undo (as after an
# earlier `down`).
down_unrecorded() {
	for saved in /run/xdpgate-backend/*/; do
		[ -d "$saved" ] || continue
		[ "$(cat "$saved/netns" 2>/dev/null || true)" = "$netns" ] || continue
		if [ ! -e "$saved/pin_dir" ]; then
			other="the record in $saved"
		elif [ -n "$(cat "$saved/pin_dir")" ]; then
			other="--pin-dir $(cat "$saved/pin_dir")"
		else
			other="no --pin-dir"
		fi
		die "down: ${netns:-this host} was set up with $other: run down with that;" \
			"nothing was changed"
	done
	refuse_unrecorded_program down
	[ -z "$gateways" ] || die "down: no gateway to remove: this host serves no frontend"
	echo "xdpgate-backend.sh: down: no frontend served"
}

up() {
	[ -n "$frontends" ] || die "up: name at least one frontend address"
	previous=$(cat "$state/decap" 2>/dev/null || true)
	if [ -z "$decap" ]; then
		if [ -n "$previous" ]; then
			decap=$previous
		else
			decap=kernel
			for fam in $(families); do
				if [ "$fam" = 4 ]; then kind=ipip; else kind=ip6tnl; fi
				kernel_has "$kind" || decap=xdpgate
			done
		fi
	fi
	# The gateways: those of earlier `up`s and these.
	gateways=$(
		cat "$state/gateways" 2>/dev/null || true
		for g in $gateways; do echo "$g"; done
	)
	gateways=$(echo "$gateways" | awk 'NF && !seen[$0]++')
	[ -n "$gateways" ] || die "up: name the gateways' outer source addresses (--gateway ADDR):" \
		"IP-in-IP from anyone else would pass by their policy (--gateway 0.0.0.0/0 --gateway" \
		"::/0 trusts any host)"
	need_gateway_families up "$(served) $frontends" "$gateways" "name one with --gateway"
	if ! command -v nft >/dev/null 2>&1; then
		[ "$decap" != kernel ] || die "up: --decap kernel needs nft (nftables) to accept" \
			"IP-in-IP from the gateways only; nothing was changed"
		echo "xdpgate-backend.sh: no nft: IP-in-IP from other sources is left to the" \
			"decap program (which drops it only when for a frontend here) and the stack" >&2
	fi
	if [ -n "$previous" ] && [ "$previous" != "$decap" ]; then
		die "up: this host decapsulates with $previous already: run down first to switch to $decap"
	fi
	if [ "$decap" = xdpgate ] && [ -z "$previous" ]; then
		refuse_unrecorded_program up
	fi
	if [ "$decap" = kernel ] && [ -z "$previous" ]; then
		for fam in $(families); do
			if [ "$fam" = 4 ]; then kind=ipip; else kind=ip6tnl; fi
			kernel_has "$kind" || die "up: this kernel cannot create $kind collect-metadata" \
				"tunnel devices (no ${kind} module?): use --decap xdpgate; nothing was changed"
		done
	fi
	if [ "$decap" = xdpgate ]; then
		[ -n "$iface" ] || iface=$(cat "$state/interface" 2>/dev/null || default_iface)
		[ -n "$iface" ] || die "up: no default route to take the interface from: give --interface"
		ipc link show dev "$iface" >/dev/null 2>&1 || die "up: no interface named '$iface'"
		set --
		for f in $frontends; do set -- "$@" --frontend "$f"; done
		for g in $gateways; do set -- "$@" --gateway "$g"; done
		# First: a refusal (another XDP program there, say) leaves everything as it was.
		if [ -n "$mode" ]; then set -- --mode "$mode" "$@"; fi
		xg decap attach "$iface" --hook "$hook" "$@"
	fi
	mkdir -p "$state"
	chmod 700 "$state"
	echo "$decap" >"$state/decap"
	echo "$pin_dir" >"$state/pin_dir"
	if [ -n "$netns" ]; then
		echo "$netns" >"$state/netns"
		netns_id "$netns" >"$state/netns_id"
	fi
	echo "$gateways" >"$state/gateways"
	if command -v nft >/dev/null 2>&1; then restrict_tunnels; fi
	if [ "$decap" = xdpgate ]; then
		echo "$iface" >"$state/interface"
		loosen_rp_filter "$iface"
	else
		for fam in $(families); do
			if [ "$fam" = 4 ]; then
				dev=xdpgate4
				ipc link show dev "$dev" >/dev/null 2>&1 || ipc link add "$dev" type ipip external
				loosen_rp_filter "$dev"
			else
				dev=xdpgate6
				ipc link show dev "$dev" >/dev/null 2>&1 ||
					ipc link add "$dev" type ip6tnl mode any external
			fi
			ipc link set "$dev" up
		done
	fi

	ipc link set lo up
	added_list
	for f in $frontends; do
		if [ "$(family "$f")" = 4 ]; then len=32; else len=128; fi
		if [ -z "$(ipc addr show dev lo to "$f/$len")" ]; then
			ipc addr add "$f/$len" dev lo
			grep -qxF "$f" "$state/added" || echo "$f" >>"$state/added"
		fi
		if ! served | grep -qxF "$f"; then
			echo "$f" >>"$state/frontends"
		fi
	done

	if [ "$mss" = yes ]; then
		for fam in $(families); do lower_mss "$fam"; done
	fi
	echo "xdpgate-backend.sh: serving$(served | tr '\n' ' ' | sed 's/^/ /;s/ $//') ($decap decap)"
}

# Stops accepting IP-in-IP from $gateways, as `up` was given them, in the program (which
# checks first), the nftables table and what later `up`s pass again. The last is refused:
# `down` alone undoes everything.
remove_gateways() {
	[ -e "$state/gateways" ] || die "down: no gateway to remove: this host serves no frontend"
	for g in $gateways; do
		grep -qxF "$g" "$state/gateways" || die "down: --gateway $g is not one of the" \
			"gateways ($(paste -s -d' ' "$state/gateways")), as up was given them; nothing was changed"
	done
	left=$(for g in $gateways; do echo "$g"; done | grep -vxF -f - "$state/gateways" || true)
	[ -n "$left" ] || die "down: that is every gateway: IP-in-IP would be accepted from no one;" \
		"run up --gateway with the new one first, or down alone to undo everything; nothing" \
		"was changed"
	# The frontends this down leaves served.
	kept=$(for f in $(served); do
		case " $frontends " in *" $f "*) ;; *) echo "$f" ;; esac
	done)
	need_gateway_families down "$kept" "$left" \
		"name those frontends too, or up --gateway another gateway of that family first"
	if [ "$(cat "$state/decap")" = xdpgate ]; then
		set --
		for g in $gateways; do set -- "$@" --gateway "$g"; done
		xg decap remove "$@" >/dev/null
	fi
	echo "$left" >"$state/gateways"
	gateways=$left
	if [ -e "$state/nft" ]; then restrict_tunnels; fi
	echo "xdpgate-backend.sh: gateways left: $(echo "$left" | paste -s -d' ')"
}

down() {
	if [ ! -d "$state" ]; then
		down_unrecorded
		return
	fi
	if [ -n "$gateways" ]; then
		remove_gateways
		[ -n "$frontends" ] || return 0
	fi
	[ -n "$frontends" ] || frontends=$(served | tr '\n' ' ')
	decap=$(cat "$state/decap" 2>/dev/null || echo "${decap:-}")
	added_list
	stopped=
	for f in $frontends; do
		if ! served | grep -qxF "$f"; then
			echo "xdpgate-backend.sh: down: $f is not served here: left as it is" >&2
			continue
		fi
		if [ "$(family "$f")" = 4 ]; then len=32; else len=128; fi
		if grep -qxF "$f" "$state/added" && [ -n "$(ipc addr show dev lo to "$f/$len")" ]; then
			ipc addr del "$f/$len" dev lo
		fi
		forget frontends "$f"
		forget added "$f"
		stopped="$stopped $f"
	done
	if [ "$decap" = xdpgate ] && [ -n "$stopped" ]; then
		set --
		for f in $stopped; do set -- "$@" --frontend "$f"; done
		# --missing-ok: one removed by hand, or recorded under another spelling, must not
		# stop a down half done (its addresses and records are gone already).
		xg decap remove --missing-ok "$@" >/dev/null
	fi
	if [ -n "$(served)" ]; then
		echo "xdpgate-backend.sh: still serving $(served | tr '\n' ' ' | sed 's/ $//')"
		return
	fi
	# None left: undo the rest.
	if [ "$decap" = xdpgate ]; then
		xg decap detach --all
	fi
	for dev in xdpgate4 xdpgate6; do
		if ipc link show dev "$dev" >/dev/null 2>&1; then ipc link del "$dev"; fi
	done
	if [ -e "$state/nft" ]; then
		in_ns nft delete table inet "$NFT_TABLE" 2>/dev/null || true
	fi
	restore_rp_filter
	restore_mss 4
	restore_mss 6
	rm -rf "$state"
	echo "xdpgate-backend.sh: down: no frontend served"
}

"$action"
