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
# CASE is one of: fanout100 fanout1000 fanout10000 latency idle19000 single1000 (default: all,
# in that order). single1000 is fanout1000 with at most 5 messages in flight, so that a sender's
# read holds about one line: what a line costs fanned out alone (chatd gives the lines of one
# read to the room together, which the other fan-out cases profit from). PAIRS defaults to 5.
# Builds nothing: the binaries are taken from ${CARGO_TARGET_DIR:-target}/release. LABEL=TEXT is put at the start of every run's label.
# BASELINE=PATH adds a third server to every round, another chatd binary (e.g. the build before a
# change, copied aside), run as server=base between the reference and chatd on the same config;
# bench/ratios.py then prints its ratios too, so before and after are measured in one run.
# PORT=N (42069 by default) is the port both servers listen on (127.0.0.1 only); chatd then gets
# a copy of config/bench.toml with that port, its own admin socket and its own state directory,
# so it never meets another chatd on this machine. PORT=A-B picks, for every run, a port of that
# range that no socket uses at that moment: ports above 32767 are also the kernel's ephemeral
# ports, and another program's client connection can hold a fixed one just when a server
# should bind it; so take a range below them, e.g. PORT=20000-29999 (with 48000-48999, one chatd
# of a 90-run comparison had exited before its load began, connection refused; its log went
# with the scratch directory, and a port taken in between is the likely cause). A server that
# exits on its own is now reported with its status, its log kept beside OUT, and the other runs
# go on.
# Run from the repository root.
set -euo pipefail
out=${1:?usage: bench/compare.sh OUT.jsonl [PAIRS] [CASE...]}
pairs=${2:-5}
shift $(($# < 2 ? $# : 2))
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(fanout100 fanout1000 fanout10000 latency idle19000 single1000)
bin=${CARGO_TARGET_DIR:-target}/release
for b in chatd chat-bench chat-reference; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: cargo build --release --bin $b first" >&2; exit 2; }
done
# shellcheck source=bench/lib.sh
. bench/lib.sh
build=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
prefix=${LABEL:-compare}
baseline=${BASELINE:-}
[ -z "$baseline" ] || [ -x "$baseline" ] || { echo "BASELINE=$baseline is not executable" >&2; exit 2; }
ports=${PORT:-42069}
scratch=$(mktemp -d /tmp/chatd-compare.XXXXXX)
config=$scratch/bench.toml

# pick_port: sets $port to PORT, or to a port of the range PORT=A-B that no socket uses now.
pick_port() {
    if [[ $ports != *-* ]]; then
        port=$ports
        return
    fi
    local lo=${ports%-*} hi=${ports#*-}
    for _ in $(seq 50); do
        port=$((lo + RANDOM % (hi - lo + 1)))
        [ -z "$(ss -Htan "( sport = :$port )")" ] && return
    done
    echo "no free port in $ports" >&2
    exit 2
}

# write_config: config/bench.toml for $port, with this run's own admin socket and state.
write_config() {
    sed -e "s/^listen = \[.*42069.*\]/listen = [\"127.0.0.1:$port\"]/" \
        -e "s|^socket = \"\"|socket = \"$scratch/admin.sock\"|" \
        -e "s|^state-dir = \"\"|state-dir = \"$scratch\"|" config/bench.toml >"$config"
    grep -q "127.0.0.1:$port" "$config" || { echo "could not set the port in $config" >&2; exit 2; }
}

args_for() {
    case $1 in
    fanout100) echo "fanout -c 100 -s 10 -d 10" ;;
    fanout1000) echo "fanout -c 1000 -s 5 -d 10" ;;
    # Seating 10,000 clients delivers 50 million join lines before the 10 s of sending start.
    fanout10000) echo "fanout -c 10000 -s 2 -d 10 --timeout 300" ;;
    latency) echo "fanout -c 100 -s 10 --rate 100 -d 10" ;;
    single1000) echo "fanout -c 1000 -s 5 -d 10 --window 5" ;;
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
    rm -rf "$scratch"
}
trap cleanup EXIT

# run_one SERVER CASE PAIR: one server started fresh, one chat-bench run, the server stopped.
run_one() {
    local server=$1 case=$2 pair=$3 args
    args=$(args_for "$case")
    pick_port
    write_config
    case $server in
    reference)
        start_reference "$bin/chat-reference" "$scratch/reference.log" "127.0.0.1:$port"
        server_pid=$reference_pid
        ;;
    base)
        start_bench_chatd "$baseline" "$scratch/base.log" "$config" "$port"
        server_pid=$chatd_pid
        ;;
    *)
        start_bench_chatd "$bin/chatd" "$scratch/chatd.log" "$config" "$port"
        server_pid=$chatd_pid
        ;;
    esac
    local label="$prefix build=$build server=$server case=$case pair=$pair load=$(cut -d' ' -f1 /proc/loadavg)"
    if ! kill -0 "$server_pid" 2>/dev/null; then
        server_gone "$server" "$case" "$pair" "before the load (this run is skipped)"
        return
    fi
    # shellcheck disable=SC2086
    "$bin/chat-bench" $args --addr "127.0.0.1:$port" --pid "$server_pid" --label "$label" >>"$out" \
        || echo "$server $case pair $pair: chat-bench exited $?" >&2
    if kill "$server_pid" 2>/dev/null; then
        wait "$server_pid" || true
    else
        server_gone "$server" "$case" "$pair" "during the load"
    fi
    server_pid=
}

# server_gone SERVER CASE PAIR WHEN: the server exited on its own; says how, and keeps its log
# beside OUT (the scratch directory goes at the end), so that one bad run does not end the rest.
server_gone() {
    local status=0 keep=${out%.jsonl}.$1-$2-$3.log
    wait "$server_pid" || status=$?
    cp "$scratch/$1.log" "$keep" 2>/dev/null || true
    echo "$1 $2 pair $3: the server exited (status $status) $4; its log: $keep" >&2
    tail -n 5 "$keep" >&2 2>/dev/null || true
    server_pid=
}

for case in "${cases[@]}"; do
    args_for "$case" >/dev/null
    for pair in $(seq "$pairs"); do
        run_one reference "$case" "$pair"
        [ -z "$baseline" ] || run_one base "$case" "$pair"
        run_one chatd "$case" "$pair"
    done
done
python3 bench/ratios.py "$out"
