#!/usr/bin/env bash
# The all-reduce across slow links (root): N network namespaces joined by veth through a
# bridge, every link shaped to RATE Mbit/s each way with tbf (scripts/slowlinks.sh), then
# `potluck bench allreduce` with one peer in each, printing its time next to the butterfly
# limit 2(N−1)/N · bytes / RATE. The namespaces are removed at the end.
#
#   scripts/netns-bench.sh [N] [RATE_MBIT] [NUMEL] [-- BENCH-ARGS...]
#   e.g. scripts/netns-bench.sh 4 100 16777216 -- --codec blockwise8 --rounds 3
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}
RATE=${2:-100}
NUMEL=${3:-16777216}
shift $(($# >= 3 ? 3 : $#))
[ "${1:-}" = "--" ] && shift
BIN=${POTLUCK:-target/release/potluck}
P=${PREFIX:-nb}
[ "$(id -u)" = 0 ] || { echo "netns-bench.sh needs root (ip netns, tc)" >&2; exit 2; }
[ -x "$BIN" ] || { echo "no $BIN: run \`make build\` first" >&2; exit 2; }
trap 'scripts/slowlinks.sh down "$P" "$N"' EXIT
scripts/slowlinks.sh up "$P" "$N" "${RATE}mbit"
"$BIN" bench allreduce --peers "$N" --numel "$NUMEL" --netns "$P" --link-mbit "$RATE" "$@"
