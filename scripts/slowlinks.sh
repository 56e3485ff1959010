#!/usr/bin/env bash
# Peers on slow links, in network namespaces (needs root, ip and tc):
#
#   ${P}0 … ${P}{N-1}   peer i at 10.98.0.(i+1)/24, its link shaped to RATE each way (tbf)
#   ${P}br              the switch: a bridge joining every peer's link
#
#   slowlinks.sh up P N RATE    e.g. slowlinks.sh up sl 4 100mbit
#   slowlinks.sh down P N
#
# `potluck bench allreduce --netns P` runs its peers in these namespaces.
set -euo pipefail
cmd=${1:?up|down}
P=${2:?prefix}
N=${3:?peers}
RATE=${4:-100mbit}
ns() { ip netns exec "$1" "${@:2}"; }

down() {
    for i in $(seq 0 $((N - 1))); do ip netns del "${P}$i" 2>/dev/null || true; done
    ip netns del "${P}br" 2>/dev/null || true
}

up() {
    ip netns add "${P}br"
    ns "${P}br" ip link set lo up
    ns "${P}br" ip link add br0 type bridge
    ns "${P}br" ip link set br0 up
    for i in $(seq 0 $((N - 1))); do
        ip netns add "${P}$i"
        ns "${P}$i" ip link set lo up
        ip link add "${P}${i}h" type veth peer name "${P}${i}b"
        ip link set "${P}${i}h" netns "${P}$i"
        ip link set "${P}${i}b" netns "${P}br"
        ns "${P}$i" ip addr add "10.98.0.$((i + 1))/24" dev "${P}${i}h"
        ns "${P}$i" ip link set "${P}${i}h" up
        ns "${P}br" ip link set "${P}${i}b" master br0 up
        # Upload (out of the peer) and download (out of the switch towards it). The burst
        # must hold a whole GSO packet (64 KiB) or tbf drops it.
        ns "${P}$i" tc qdisc add dev "${P}${i}h" root tbf rate "$RATE" burst 256kb latency 50ms
        ns "${P}br" tc qdisc add dev "${P}${i}b" root tbf rate "$RATE" burst 256kb latency 50ms
    done
}

case $cmd in
    up) down; up ;;
    down) down ;;
    *) echo "usage: slowlinks.sh up|down PREFIX N [RATE]" >&2; exit 2 ;;
esac
