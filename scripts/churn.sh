#!/usr/bin/env bash
# Churn on loopback with the real binary: a `dht serve` bootstrap and N training peers; every
# EVERY seconds the oldest peer is killed with SIGKILL and a fresh one (a new identity) joins,
# until the run's last epoch. Then it reports, from the logs: whether every peer that lived to
# the end finished, any non-finite loss, how soon each newcomer trained with the swarm after
# downloading its state, and the swarm's loss over the epochs.
#
#   scripts/churn.sh OUT [N] [EVERY] -- TRAIN-ARGS...
#   REPORT_ONLY=1 scripts/churn.sh OUT N EVERY -- TRAIN-ARGS...   (score an earlier run's logs)
#   e.g. scripts/churn.sh runs/churn 6 20 -- --config small --data data/shapes \
#            --target-batch-size 256 --epochs 30 --warmup 5 --micro-batch 16
#
# Exits non-zero when a check fails. Every peer's output goes to OUT/peerI.log.
set -euo pipefail
OUT=${1:?output directory}
N=${2:-6}
EVERY=${3:-20}
shift $(($# >= 3 ? 3 : $#))
[ "${1:-}" = "--" ] && shift
BIN=${POTLUCK:-target/release/potluck}
RUN=${RUN:-churn-$$}
EPOCHS=$(printf '%s\n' "$@" | grep -A1 -x -- --epochs | tail -1)
[ -n "$EPOCHS" ] || { echo "give --epochs" >&2; exit 2; }
if [ "${REPORT_ONLY:-}" = 1 ]; then
    # Score the logs of an earlier run in OUT (N, EVERY and the arguments as it had them).
    next=$(ls "$OUT"/peer*.log | wc -l)
    oldest=$((next - N))
    killed=$oldest
    started=$(date +%s)
else
rm -rf "$OUT"
mkdir -p "$OUT"

declare -A pid
trap 'kill -9 "${pid[@]}" "$boot" 2>/dev/null || true' EXIT
"$BIN" dht serve --listen /ip4/127.0.0.1/tcp/0 >"$OUT/boot.log" 2>&1 &
boot=$!
addr=""
for _ in $(seq 300); do
    addr=$(grep -o "/ip4/127.0.0.1/tcp/[0-9]*/p2p/[A-Za-z0-9]*" "$OUT/boot.log" | head -1 || true)
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || { cat "$OUT/boot.log"; echo "the bootstrap printed no address" >&2; exit 1; }

start() {
    "$BIN" train --run-id "$RUN" --threads 1 --out "$OUT/peer$1" \
        --listen /ip4/127.0.0.1/tcp/0 --initial-peers "$addr" "${args[@]}" \
        >"$OUT/peer$1.log" 2>&1 &
    pid[$1]=$!
}
args=("$@")
for i in $(seq 0 $((N - 1))); do start "$i"; done
next=$N
oldest=0
killed=0
started=$(date +%s)
# Kill and replace on schedule while the run goes on (it ends when a peer finishes).
while sleep "$EVERY"; do
    # Ended (or ending: a newcomer would find no one left to download from).
    finished=$(cat "$OUT"/peer*.log | grep -c -e "trained to epoch" -e "epoch $EPOCHS done" || true)
    [ "$finished" -gt 0 ] && break
    alive=0
    for p in "${pid[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    [ "$alive" -gt 0 ] || { echo "every peer is gone" >&2; exit 1; }
    kill -9 "${pid[$oldest]}" 2>/dev/null || true
    wait "${pid[$oldest]}" 2>/dev/null || true
    unset "pid[$oldest]"
    echo "$(($(date +%s) - started)) s: killed peer $oldest, started peer $next"
    killed=$((killed + 1))
    oldest=$((oldest + 1))
    start "$next"
    next=$((next + 1))
done
status=0
for i in "${!pid[@]}"; do wait "${pid[$i]}" || { echo "peer $i failed" >&2; status=1; }; done
pid=()
kill "$boot" 2>/dev/null || true
fi
status=${status:-0}

echo "== $killed peers killed in $(($(date +%s) - started)) s; $N alive at any time"
for i in $(seq "$oldest" $((next - 1))); do
    grep -q "trained to epoch $EPOCHS" "$OUT/peer$i.log" ||
        { echo "peer $i (alive at the end) did not finish epoch $EPOCHS" >&2; status=1; }
done
if grep -l -E "loss NaN|not finite|non-finite" "$OUT"/peer*.log; then
    echo "non-finite values above" >&2
    status=1
fi
# A newcomer holds the swarm's parameters as soon as it downloaded the state of epoch E. It
# joins mid-way through epoch E; if that epoch's group formed before it came, it downloads
# E+1's state at the epoch's end and averages in E+1 (step E+2): it should be in a group by then.
echo "== newcomers: the state they downloaded, and their first epoch with the swarm"
for i in $(seq "$N" $((next - 1))); do
    log="$OUT/peer$i.log"
    downloads=$(grep -o "^downloaded the swarm's state at epoch [0-9]*" "$log" | grep -o "[0-9]*$" || true)
    e=$(echo "$downloads" | head -1)
    if [ -z "$e" ]; then
        # Killed before it joined, or the run ended first.
        echo "peer $i: no download (log: $(tail -1 "$log" | cut -c1-100))"
        continue
    fi
    first=$(grep -o "epoch [0-9]* done: .* in a group of [0-9]*" "$log" |
        awk '$NF > 1 { print $2; exit }' || true)
    got="downloaded epoch$(echo "$downloads" | tr '\n' ' ' | sed 's/ $//; s/ /, /g; s/^/ /')"
    if [ -z "$first" ]; then
        echo "peer $i: $got, no epoch with the swarm (killed first, or the run ended)"
    elif [ "$first" -le $((e + 2)) ]; then
        echo "peer $i: $got, averaged with the swarm in step $first"
    else
        echo "peer $i: $got, but first averaged in step $first" >&2
        status=1
    fi
done
alone=$(cat "$OUT"/peer*.log | grep -c "stepping alone" || true)
echo "== epochs a peer stepped alone though others were around: $alone"
# The loss, averaged over the peers that ended each epoch, every few epochs.
echo "== loss by epoch (mean over peers)"
grep -ho "epoch [0-9]* done: .*loss [0-9.]*" "$OUT"/peer*.log |
    awk '{ e = $2; l = $NF; if ($0 ~ /\(0 here\)/) next; s[e] += l; n[e]++ }
         END { for (e in s) printf "%d %.4f\n", e, s[e] / n[e] }' | sort -n >"$OUT/loss.txt"
awk -v every=$(( (EPOCHS + 9) / 10 )) '$1 % every == 0 || $1 == 1 { printf "epoch %3d  %.4f\n", $1, $2 }' \
    "$OUT/loss.txt"
awk -v n="$EPOCHS" '$1 <= 5 { a += $2; na++ } $1 > n - 5 { b += $2; nb++ }
    END { if (na == 0 || nb == 0 || b / nb >= a / na) { print "the loss did not fall"; exit 1 }
          printf "mean loss: first 5 epochs %.4f, last 5 %.4f\n", a / na, b / nb }' \
    "$OUT/loss.txt" || status=1
exit "$status"
