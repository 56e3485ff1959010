#!/usr/bin/env bash
# A local swarm: N training peers of one run on this machine (loopback), or in network
# namespaces made by slowlinks.sh (peer i in ${NETNS}i at 10.98.0.(i+1)), each with one kernel
# thread per core it gets; waits for them, then scores the first peer's checkpoint (shapes).
#
#   scripts/swarm.sh OUT N -- TRAIN-ARGS...
#   e.g. scripts/swarm.sh runs/three 3 -- --config small --data data/shapes \
#            --target-batch-size 192 --epochs 250 --warmup 25
#   NETNS=sl scripts/swarm.sh runs/slow 4 -- ...   (after scripts/slowlinks.sh up sl 4 100mbit)
#
# Every peer's output goes to OUT/peerI.log; their checkpoints to OUT/peerI. POTLUCK names the
# binary (default target/release/potluck); PROMPTS=0 skips the score; FIRST adds flags to the
# first peer alone (e.g. FIRST="--throttle 4": an uneven peer).
set -euo pipefail
OUT=${1:?output directory}
N=${2:?peers}
shift 2
[ "${1:-}" = "--" ] && shift
BIN=${POTLUCK:-target/release/potluck}
NETNS=${NETNS:-}
THREADS=${THREADS:-$(( ($(nproc) + N - 1) / N ))}
RUN=${RUN:-swarm-$$}
mkdir -p "$OUT"
in_ns() { if [ -n "$NETNS" ]; then ip netns exec "${NETNS}$1" "${@:2}"; else "${@:2}"; fi; }
host() { if [ -n "$NETNS" ]; then echo "10.98.0.$(($1 + 1))"; else echo 127.0.0.1; fi; }

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
read -r -a first <<<"${FIRST:-}"
# Every peer listens on TCP and QUIC, as train does by default, and the others join through
# peer 0's QUIC address; TRANSPORT=tcp: on TCP alone.
transport() { if [ "${TRANSPORT:-quic}" = tcp ]; then echo "tcp/[0-9]*"; else echo "udp/[0-9]*/quic-v1"; fi; }
listen() { echo "--listen=/ip4/$(host "$1")/tcp/0"; [ "${TRANSPORT:-quic}" = tcp ] || echo "--listen=/ip4/$(host "$1")/udp/0/quic-v1"; }
in_ns 0 "$BIN" train --run-id "$RUN" --threads "$THREADS" --out "$OUT/peer0" \
    $(listen 0) "$@" "${first[@]}" >"$OUT/peer0.log" 2>&1 &
pids+=($!)
addr=""
for _ in $(seq 600); do
    addr=$(grep -o "/ip4/$(host 0)/$(transport)/p2p/[A-Za-z0-9]*" "$OUT/peer0.log" | head -1 || true)
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || { cat "$OUT/peer0.log"; echo "peer 0 printed no address" >&2; exit 1; }
for i in $(seq 1 $((N - 1))); do
    in_ns "$i" "$BIN" train --run-id "$RUN" --threads "$THREADS" --out "$OUT/peer$i" \
        $(listen "$i") --initial-peers "$addr" "$@" \
        >"$OUT/peer$i.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()
for i in $(seq 0 $((N - 1))); do
    echo "peer $i: $(grep -h 'trained to epoch' "$OUT/peer$i.log" || echo 'did not finish')"
done
[ "$status" = 0 ] || { echo "a peer failed: see $OUT/peer*.log" >&2; exit 1; }
PROMPTS=${PROMPTS:-200}
[ "$PROMPTS" = 0 ] || "$BIN" eval --checkpoint "$OUT/peer0" --prompts "$PROMPTS" | tail -1
