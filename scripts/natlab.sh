#!/usr/bin/env bash
# A small Internet in network namespaces, for NAT tests (needs root, ip and iptables):
#
#   ${P}pub   10.99.0.1/24 on a bridge: the public network (a relay / bootstrap node runs here)
#   ${P}ra    router of home A: 10.99.0.2 outside, 192.168.10.1 inside, masquerading
#   ${P}a     a peer at home A: 192.168.10.2, default route through ${P}ra
#   ${P}rb    router of home B: 10.99.0.3 outside, 192.168.20.1 inside, masquerading
#   ${P}b     a peer at home B: 192.168.20.2, default route through ${P}rb
#
# Nothing outside reaches a home peer: its router has no port forwarding and drops what
# nobody inside asked for, as a home NAT.
#
#   natlab.sh up P      build it (P: a short prefix, e.g. pl123)
#   natlab.sh down P    remove it
set -euo pipefail
cmd=${1:?up|down}
P=${2:?prefix}
ns() { ip netns exec "$1" "${@:2}"; }

down() {
    for n in pub ra a rb b; do ip netns del "${P}$n" 2>/dev/null || true; done
}

up() {
    for n in pub ra a rb b; do ip netns add "${P}$n"; ns "${P}$n" ip link set lo up; done
    ns "${P}pub" ip link add br0 type bridge
    ns "${P}pub" ip addr add 10.99.0.1/24 dev br0
    ns "${P}pub" ip link set br0 up
    local i=2
    for h in a b; do
        local sub=$(( i * 10 - 10 ))
        # router <-> public bridge
        ip link add "${P}${h}o" type veth peer name "${P}${h}p"
        ip link set "${P}${h}o" netns "${P}r$h"
        ip link set "${P}${h}p" netns "${P}pub"
        ns "${P}pub" ip link set "${P}${h}p" master br0 up
        ns "${P}r$h" ip addr add "10.99.0.$i/24" dev "${P}${h}o"
        ns "${P}r$h" ip link set "${P}${h}o" up
        # router <-> home peer
        ip link add "${P}${h}i" type veth peer name "${P}${h}h"
        ip link set "${P}${h}i" netns "${P}r$h"
        ip link set "${P}${h}h" netns "${P}$h"
        ns "${P}r$h" ip addr add "192.168.$sub.1/24" dev "${P}${h}i"
        ns "${P}r$h" ip link set "${P}${h}i" up
        ns "${P}$h" ip addr add "192.168.$sub.2/24" dev "${P}${h}h"
        ns "${P}$h" ip link set "${P}${h}h" up
        ns "${P}$h" ip route add default via "192.168.$sub.1"
        ns "${P}r$h" sysctl -qw net.ipv4.ip_forward=1
        ns "${P}r$h" iptables -t nat -A POSTROUTING -o "${P}${h}o" -j MASQUERADE
        # As a home router: unsolicited packets from outside are dropped, not answered.
        ns "${P}r$h" iptables -A INPUT -i "${P}${h}o" -m conntrack --ctstate NEW,INVALID -j DROP
        i=$(( i + 1 ))
    done
}

case $cmd in
    up) down; up ;;
    down) down ;;
    *) echo "usage: natlab.sh up|down PREFIX" >&2; exit 2 ;;
esac
