#!/usr/bin/env bash
# Three `small` peers on shaped links (needs root, ip and tc: see slowlinks.sh), in the three
# ways a run can average, at each rate given; prints each peer's closing traffic line:
#
#   (a) every step averaged in f32         --codec none
#   (b) every step, the codec plan         --codec auto
#   (c) local updates, rounds of H batches --codec auto --local-steps H --delayed-updates
#
#   scripts/home-links.sh OUT DATA [RATE...]     e.g. scripts/home-links.sh runs/links data/shapes 10mbit 100mbit
#
# DATA is a `prepare --dataset shapes` directory. EPOCHS (default 10) epochs for (a) and (b),
# ROUNDS (default 4) rounds of H (default 32) batches of TARGET (default 96) samples for (c).
# MODES (default "a b c") picks the ways; FIRST adds flags to peer 0 alone (FIRST="--throttle
# 4": an uneven peer). Every peer's log is OUT/RATE-MODE/peerI.log.
set -euo pipefail
OUT=${1:?output directory}
DATA=${2:?prepared shapes data}
shift 2
RATES=("${@:-10mbit}")
EPOCHS=${EPOCHS:-10}
ROUNDS=${ROUNDS:-4}
H=${H:-32}
TARGET=${TARGET:-96}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
trap '"$here/slowlinks.sh" down hl 3' EXIT
common=(--config small --data "$DATA" --target-batch-size "$TARGET" --micro-batch 16
)
for rate in "${RATES[@]}"; do
    "$here/slowlinks.sh" up hl 3 "$rate"
    for mode in ${MODES:-a b c}; do
        case $mode in
            a) flags=(--codec none --epochs "$EPOCHS") ;;
            b) flags=(--codec auto --epochs "$EPOCHS") ;;
            c) flags=(--codec auto --local-steps "$H" --delayed-updates --epochs "$ROUNDS") ;;
        esac
        dir="$OUT/$rate-$mode"
        rm -rf "$dir"
        NETNS=hl PROMPTS=0 RUN="links-$rate-$mode" "$here/swarm.sh" "$dir" 3 -- \
            "${common[@]}" "${flags[@]}" >"$dir.out" 2>&1 || echo "($rate $mode: a peer failed)"
        for i in 0 1 2; do
            echo "$rate ($mode) peer $i: $(grep -h '^traffic:' "$dir/peer$i.log" || echo 'no traffic line')"
        done
    done
done
