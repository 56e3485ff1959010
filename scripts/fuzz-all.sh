#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ in turn, SECONDS each (default 600), on the stable toolchain
# without a sanitizer (see docs/FUZZING.md); stops at the first crash and says where its input is.
#
#   scripts/fuzz-all.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${1:-600}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
targets=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^potluck-fuzz$')
for t in $targets; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "== $t: ${SECONDS_EACH} s"
    if ! cargo fuzz run -s none -O "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 2>"/tmp/fuzz-$t.log"; then
        tail -30 "/tmp/fuzz-$t.log"
        echo "$t crashed: its input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "/tmp/fuzz-$t.log" | tail -1
done
echo "every target ran ${SECONDS_EACH} s without a crash"
