#!/usr/bin/env bash
# Peak resident memory of the peers of a run: scripts/swarm.sh's N training peers on loopback
# (one kernel thread each unless THREADS says otherwise), each under GNU time; prints every
# peer's peak RSS and the epoch it reached.
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
[ -x /usr/bin/time ] || { echo "needs GNU time (/usr/bin/time)" >&2; exit 1; }
rm -rf "$OUT"
mkdir -p "$OUT"
# swarm.sh starts the binary it is given: give it this one under GNU time.
cat >"$OUT/timed" <<WRAP
#!/usr/bin/env bash
exec /usr/bin/time -f "peak RSS %M KiB" "$BIN" "\$@"
WRAP
chmod +x "$OUT/timed"
status=0
POTLUCK="$OUT/timed" THREADS=${THREADS:-1} RUN=${RUN:-memory-$$} PROMPTS=0 \
    "$(dirname "$0")/swarm.sh" "$OUT" "$N" -- "$@" >/dev/null || status=1
for i in $(seq 0 $((N - 1))); do
    kib=$(grep -ho 'peak RSS [0-9]*' "$OUT/peer$i.log" | grep -o '[0-9]*$' || echo 0)
    echo "peer $i: peak RSS $((kib / 1024)) MiB; $(grep -h 'trained to epoch' "$OUT/peer$i.log" || echo 'did not finish')"
done
[ "$status" = 0 ] || { echo "a peer failed: see $OUT/peer*.log" >&2; exit 1; }
