#!/usr/bin/env bash
# chatd against the reference server (chat-reference, a ceiling, never a product), interleaved:
# for each case, PAIRS times: a fresh reference, one chat-bench run, a fresh chatd on
# config/bench.toml, the same chat-bench run. Appends one JSON line per run to OUT and then
# prints the summary of bench/ratios.py (medians, ratios chatd/reference, steal per run).
# Interleaving is what makes the ratios mean something on a shared, noisy machine: both servers
# see the same disturbances, spread over the same minutes.
#
#   cargo build --release --bin chatd --bin chat-bench --bin chat-reference
#   bench/compare.sh OUT.jsonl [PAIRS] [CASE...]
#
# CASE is one of: fanout100 fanout1000 fanout10000 latency idle19000 (default: all, in that
# order). PAIRS defaults to 5. Builds nothing: the binaries are taken from
# ${CARGO_TARGET_DIR:-target}/release. LABEL=TEXT is put at the start of every run's label.
# Needs port 42069 free. Run from the repository root.
set -euo pipefail
out=${1:?usage: bench/compare.sh OUT.jsonl [PAIRS] [CASE...]}
pairs=${2:-5}
shift $(($# < 2 ? $# : 2))
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(fanout100 fanout1000 fanout10000 latency idle19000)
bin=${CARGO_TARGET_DIR:-target}/release
for b in chatd chat-bench chat-reference; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: cargo build --release --bin $b first" >&2; exit 2; }
done
# shellcheck source=bench/lib.sh
. bench/lib.sh
build=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
prefix=${LABEL:-compare}

args_for() {
    case $1 in
    fanout100) echo "fanout -c 100 -s 10 -d 10" ;;
    fanout1000) echo "fanout -c 1000 -s 5 -d 10" ;;
    # Seating 10,000 clients delivers 50 million join lines before the 10 s of sending start.
    fanout10000) echo "fanout -c 10000 -s 2 -d 10 --timeout 300" ;;
    latency) echo "fanout -c 100 -s 10 --rate 100 -d 10" ;;
    idle19000) echo "idle -c 19000 --join-rate 1000 --timeout 600" ;;
    *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}

server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# run_one SERVER CASE PAIR: one server started fresh, one chat-bench run, the server stopped.
run_one() {
    local server=$1 case=$2 pair=$3 args
    args=$(args_for "$case")
    if [ "$server" = reference ]; then
        start_reference "$bin/chat-reference" /tmp/chat-reference-compare.log
        server_pid=$reference_pid
    else
        start_bench_chatd "$bin/chatd" /tmp/chatd-compare.log
        server_pid=$chatd_pid
    fi
    local label="$prefix build=$build server=$server case=$case pair=$pair load=$(cut -d' ' -f1 /proc/loadavg)"
    # shellcheck disable=SC2086
    "$bin/chat-bench" $args --pid "$server_pid" --label "$label" >>"$out" \
        || echo "$server $case pair $pair: chat-bench exited $?" >&2
    kill "$server_pid"
    wait "$server_pid" || true
    server_pid=
}

for case in "${cases[@]}"; do
    args_for "$case" >/dev/null
    for pair in $(seq "$pairs"); do
        run_one reference "$case" "$pair"
        run_one chatd "$case" "$pair"
    done
done
python3 bench/ratios.py "$out"
