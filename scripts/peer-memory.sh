#!/usr/bin/env bash
# Peak resident memory of the peers of a run: N training peers on loopback (as
# scripts/swarm.sh starts them), each under GNU time; prints every peer's peak RSS and the
# epoch it reached.
#
#   scripts/peer-memory.sh OUT N -- TRAIN-ARGS...
#   e.g. scripts/peer-memory.sh /tmp/mem 2 -- --config gpt --data data/shapes \
#            --target-batch-size 16 --micro-batch 4 --epochs 8 --state-every 4
#
# POTLUCK names the binary (default target/release/potluck), so two builds can be compared
# in one sitting. Every peer's output goes to OUT/peerI.log.
set -euo pipefail
OUT=${1:?output directory}
N=${2:?peers}
shift 2
[ "${1:-}" = "--" ] && shift
BIN=$(realpath "${POTLUCK:-target/release/potluck}")
THREADS=${THREADS:-1}
RUN=${RUN:-memory-$$}
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"
timed() { /usr/bin/time -f "peak RSS %M KiB" "$BIN" "$@"; }

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
timed train --run-id "$RUN" --threads "$THREADS" --out "$OUT/peer0" \
    --listen /ip4/127.0.0.1/tcp/0 "$@" >"$OUT/peer0.log" 2>&1 &
pids+=($!)
addr=""
for _ in $(seq 600); do
    addr=$(grep -o "/ip4/127.0.0.1/tcp/[0-9]*/p2p/[A-Za-z0-9]*" "$OUT/peer0.log" | head -1 || true)
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || { cat "$OUT/peer0.log"; echo "peer 0 printed no address" >&2; exit 1; }
for i in $(seq 1 $((N - 1))); do
    timed train --run-id "$RUN" --threads "$THREADS" --out "$OUT/peer$i" \
        --listen /ip4/127.0.0.1/tcp/0 --initial-peers "$addr" "$@" >"$OUT/peer$i.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()
for i in $(seq 0 $((N - 1))); do
    kib=$(grep -ho 'peak RSS [0-9]*' "$OUT/peer$i.log" | grep -o '[0-9]*$' || echo 0)
    echo "peer $i: peak RSS $((kib / 1024)) MiB; $(grep -h 'trained to epoch' "$OUT/peer$i.log" || echo 'did not finish')"
done
[ "$status" = 0 ] || { echo "a peer failed: see $OUT/peer*.log" >&2; exit 1; }
