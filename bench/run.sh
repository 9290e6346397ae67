#!/usr/bin/env bash
# Runs the benchmark suite of docs/performance.md against a fresh release chatd per run, on
# config/bench.toml, appending one JSON line per run to OUT.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/run.sh OUT.jsonl [LABEL] [RUNS] [CASE...]
#
# CASE is one of: fanout100 fanout1000 latency idle5000 idle10000 idle19000 (default: all).
# Needs port 42069 free. Run from the repository root. CHATD=PATH runs another chatd binary
# (an A/B comparison against an older build); the load generator stays target/release/chat-bench.
set -euo pipefail
out=${1:?usage: bench/run.sh OUT.jsonl [LABEL] [RUNS] [CASE...]}
label=${2:-}
runs=${3:-3}
shift $(($# < 3 ? $# : 3))
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(fanout100 fanout1000 latency idle5000 idle10000 idle19000)
bin=target/release
# shellcheck source=bench/lib.sh
. bench/lib.sh
chatd=${CHATD:-$bin/chatd}

args_for() {
    case $1 in
    fanout100) echo "fanout -c 100 -s 10 -d 10" ;;
    fanout1000) echo "fanout -c 1000 -s 5 -d 10" ;;
    latency) echo "fanout -c 100 -s 10 --rate 100 -d 10" ;;
    idle5000) echo "idle -c 5000 --join-rate 1000" ;;
    idle10000) echo "idle -c 10000 --join-rate 1000 --timeout 300" ;;
    idle19000) echo "idle -c 19000 --join-rate 1000 --timeout 600" ;;
    *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}

for case in "${cases[@]}"; do
    args=$(args_for "$case")
    for run in $(seq "$runs"); do
        start_bench_chatd "$chatd" /tmp/chatd-bench.log
        pid=$chatd_pid
        # shellcheck disable=SC2086
        "$bin/chat-bench" $args --pid "$pid" --label "$label $case run $run load $(cut -d' ' -f1 /proc/loadavg)" >>"$out" || echo "run $case/$run exited $?" >&2
        kill "$pid"
        wait "$pid" || true
    done
done
