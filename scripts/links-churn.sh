#!/usr/bin/env bash
# Churn on shaped links in local-update mode (needs root, ip and tc: see slowlinks.sh): three
# `small` peers, each in its own namespace behind a link of RATE each way, average rounds of H
# batches of TARGET samples. Once the swarm ends round KILL_AFTER, and AFTER more seconds (mid-
# round), peer 0 is killed (SIGKILL) and a fresh peer joins from a fourth namespace through
# peer 1. Prints each peer's closing lines: in which rounds it averaged, and its traffic.
#
#   scripts/links-churn.sh OUT DATA [RATE]      e.g. scripts/links-churn.sh runs/lc data/shapes 10mbit
#
# DATA is a `prepare --dataset shapes` directory. ROUNDS (default 6) rounds of H (default 32)
# batches of TARGET (default 96); KILL_AFTER (default 2), AFTER (default 20). Every peer's log is
# OUT/peerI.log (peer 3 is the newcomer). POTLUCK names the binary.
set -euo pipefail
OUT=${1:?output directory}
DATA=${2:?prepared shapes data}
RATE=${3:-10mbit}
ROUNDS=${ROUNDS:-6}
H=${H:-32}
TARGET=${TARGET:-96}
KILL_AFTER=${KILL_AFTER:-2}
AFTER=${AFTER:-20}
BIN=${POTLUCK:-target/release/potluck}
RUN=${RUN:-links-churn-$$}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$OUT"
mkdir -p "$OUT"
"$here/slowlinks.sh" down lc 4
"$here/slowlinks.sh" up lc 4 "$RATE"
declare -A pid
trap 'kill -9 "${pid[@]}" 2>/dev/null || true; "$here/slowlinks.sh" down lc 4' EXIT
flags=(train --run-id "$RUN" --config small --data "$DATA" --target-batch-size "$TARGET"
    --micro-batch 16 --codec auto --local-steps "$H" --delayed-updates --epochs "$ROUNDS"
    --threads 1)
# The QUIC address peer I printed (in namespace lcI at 10.98.0.(I+1)); every peer listens on
# TCP and QUIC, as train does by default.
address() {
    local a=""
    for _ in $(seq 600); do
        a=$(grep -o "/ip4/10.98.0.$(($1 + 1))/udp/[0-9]*/quic-v1/p2p/[A-Za-z0-9]*" "$OUT/peer$1.log" |
            head -1 || true)
        [ -n "$a" ] && break
        sleep 0.1
    done
    [ -n "$a" ] || { cat "$OUT/peer$1.log"; echo "peer $1 printed no address" >&2; exit 1; }
    echo "$a"
}
start() {
    ip netns exec "lc$1" "$BIN" "${flags[@]}" --out "$OUT/peer$1" \
        --listen "/ip4/10.98.0.$(($1 + 1))/tcp/0" --listen "/ip4/10.98.0.$(($1 + 1))/udp/0/quic-v1" \
        "${@:2}" >"$OUT/peer$1.log" 2>&1 &
    pid[$1]=$!
}
started=$(date +%s)
start 0
first=$(address 0)
start 1 --initial-peers "$first"
start 2 --initial-peers "$first"
until grep -q "^epoch $KILL_AFTER done\|INFO epoch $KILL_AFTER done" "$OUT/peer1.log"; do
    kill -0 "${pid[1]}" 2>/dev/null || { echo "peer 1 ended before round $KILL_AFTER" >&2; exit 1; }
    sleep 1
done
sleep "$AFTER"
kill -9 "${pid[0]}"
wait "${pid[0]}" 2>/dev/null || true
unset "pid[0]"
echo "$(($(date +%s) - started)) s: killed peer 0 (round $KILL_AFTER ended $AFTER s before)"
start 3 --initial-peers "$(address 1)"
status=0
for i in 1 2 3; do wait "${pid[$i]}" || { echo "peer $i failed" >&2; status=1; }; done
pid=()
echo "== $(($(date +%s) - started)) s in all"
for i in 1 2 3; do
    log="$OUT/peer$i.log"
    echo "peer $i: $(grep -h "^trained to epoch" "$log" || echo 'did not finish')"
    grep -h -e "^downloaded the swarm's state" -e "^averaged with other peers" -e "^traffic:" \
        "$log" | sed 's/^/  /'
done
exit "$status"
