#!/usr/bin/env bash
# hivemind's all-reduce against potluck's, on the same machine, in one run.
#
# Installs hivemind 1.1.12 from PyPI into a virtualenv (torch comes with it: ~3 GB, cached by
# pip; the virtualenv is temporary unless HIVEMIND_VENV names one to keep), then, for every
# shape, averages the same buffer with hivemind's DecentralizedAverager on N local peers
# (scripts/hivemind_allreduce.py: one warm-up round, then the median of ROUNDS; matchmaking not
# timed) and right after with `potluck bench allreduce` on as many peers, and prints both
# times and their ratio.
#
#   scripts/compare-hivemind.sh [PEERSxNUMEL ...]
#   e.g. scripts/compare-hivemind.sh 2x16777216 4x67108864
#
# Environment: ROUNDS (6), CODEC (none; also fp16 or uniform8, hivemind's names), POTLUCK (the
# binary, target/release/potluck; `make build` makes it), HIVEMIND_VENV, OUT (a folder for the
# JSON of every run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-6}
CODEC=${CODEC:-none}
BIN=${POTLUCK:-target/release/potluck}
[ -x "$BIN" ] || { echo "no $BIN: run \`make build\` first" >&2; exit 2; }
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(2x16777216 2x67108864 4x16777216 4x67108864)
case $CODEC in
    none) ours=none ;;
    fp16) ours=fp16 ;;
    uniform8) ours=uniform8 ;;
    *) echo "CODEC is none, fp16 or uniform8" >&2; exit 2 ;;
esac

venv=${HIVEMIND_VENV:-}
if [ -z "$venv" ]; then
    venv=$(mktemp -d)
    trap 'rm -rf "$venv"' EXIT
fi
if ! "$venv/bin/python" -c "import hivemind" 2>/dev/null; then
    echo "installing hivemind 1.1.12 (and torch) into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch hivemind==1.1.12 "numpy<2.4"
fi
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

printf '%-6s %-10s %-6s %12s %12s %8s\n' peers floats codec hivemind_s potluck_s faster
for shape in "${shapes[@]}"; do
    n=${shape%x*}
    m=${shape#*x}
    h="$out/hivemind-$n-$m-$CODEC.json"
    p="$out/potluck-$n-$m-$CODEC.json"
    "$venv/bin/python" scripts/hivemind_allreduce.py --peers "$n" --numel "$m" \
        --rounds "$ROUNDS" --warmup 1 --codec "$CODEC" >"$h" 2>"$out/hivemind-$n-$m.log" || {
        tail -20 "$out/hivemind-$n-$m.log" >&2
        echo "hivemind failed on $shape (log above)" >&2
        exit 1
    }
    "$BIN" bench allreduce --peers "$n" --numel "$m" --codec "$ours" --rounds "$ROUNDS" \
        --json >"$p"
    hs=$(field "$h" median_wall_s)
    ps=$(field "$p" median_wall_s)
    printf '%-6s %-10s %-6s %12.3f %12.3f %7.2fx\n' "$n" "$m" "$CODEC" "$hs" "$ps" \
        "$(python3 -c "print($hs / $ps)")"
    echo "       hivemind rounds $(field "$h" rounds_s | tr -d '[]'), max error $(field "$h" max_error), peak RSS $(field "$h" peak_rss_mib)"
    echo "       potluck rounds $(python3 -c "import json; print(', '.join('%.3f' % r['wall_s'] for r in json.load(open('$p'))['rounds']))"), max error $(python3 -c "import json; print(max(r['max_error'] for r in json.load(open('$p'))['rounds']))")"
    echo "       ring copies of the same traffic: libp2p streams $(field "$p" ring_copy_s) s, direct channels $(field "$p" direct_ring_copy_s) s"
done
echo "JSON of every run: $out"
