#!/usr/bin/env bash
# The cluster benchmarks of docs/performance.md: one NATS server (JetStream, file storage, in a
# fresh temp dir per run) and two chatd nodes on this machine, with the single-node figure of
# the same case measured in the same run beside it. Appends one JSON line per run to OUT.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/cluster.sh OUT.jsonl [LABEL] [RUNS] [CASE...]
#
# CASE is one of: fanout1000 fanout100 latency bus idle5000 (default: all).
#   fanout1000  1,000 clients over 2 nodes, 5 senders, as fast as the window allows; and the
#               same on one node
#   fanout100   100 clients over 2 nodes, 10 senders; and the same on one node
#   latency     100 receivers on node B, 1 sender on node A at 100 msg/s: latency across nodes
#   bus         one client per node, one sending as fast as it can: messages/s through the bus
#   idle5000    5,000 idle joined clients over 2 nodes: RSS per connection per node; and on
#               one node
# Needs nats-server (Debian: apt-get install nats-server) and three free ports: by default 42069
# and 42079 (the two chatd nodes; the single node uses the first) and 4222 (NATS). Environment:
#   CHATD_BENCH_PORTS="A B"  the nodes' chat ports instead of "42069 42079"
#   CHATD_BENCH_NATS_PORT=N  NATS's client port instead of 4222
#   CHATD_BIN_DIR=DIR        where chatd, chatctl and chat-bench are (default:
#                            $CARGO_TARGET_DIR/release, else target/release)
#   CHATD_NODE_ENV="K=V ..."  extra environment for every chatd started (e.g. MALLOC_ARENA_MAX=2)
#   KEEP=1                   keep the work directory (configs, logs) after the run
set -euo pipefail
out=${1:?usage: bench/cluster.sh OUT.jsonl [LABEL] [RUNS] [CASE...]}
label=${2:-}
runs=${3:-3}
shift $(($# < 3 ? $# : 3))
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(fanout1000 fanout100 latency bus idle5000)
bin=${CHATD_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
read -r port_a port_b <<<"${CHATD_BENCH_PORTS:-42069 42079}"
nats_port=${CHATD_BENCH_NATS_PORT:-4222}
node_env=${CHATD_NODE_ENV:-}
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$nats" ] || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 2; }
work=$(mktemp -d /tmp/chatd-cluster-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# node NAME PORT: a chatd on config/bench.toml plus a [cluster] table, on PORT.
node_config() {
    local dir=$work/$1
    mkdir -p "$dir"
    sed -e "s|^listen = .*|listen = [\"127.0.0.1:$2\"]|" \
        -e "s|^state-dir = .*|state-dir = \"$dir/state\"|" \
        -e "s|^socket = .*|socket = \"$dir/admin.sock\"|" \
        -e "s|^group = .*|group = \"\"|" config/bench.toml >"$dir/chatd.toml"
    if [ "$3" = cluster ]; then
        printf '\n[cluster]\nnats = ["nats://127.0.0.1:%s"]\nnode = "%s"\nname = "bench"\n' "$nats_port" "$1" >>"$dir/chatd.toml"
    fi
}

# A port in the ephemeral range can be held by an outgoing connection: a previous run's client
# that got it as its own port stays in TIME-WAIT for 60 s after closing. NATS is started again
# every 2 s, for up to 70 s, until it can listen.
start_nats() {
    local attempt
    for attempt in $(seq 35); do
        rm -rf "$work/js"
        "$nats" -a 127.0.0.1 -p "$nats_port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
        nats_pid=$!
        sleep 0.3
        if kill -0 "$nats_pid" 2>/dev/null; then
            pids+=("$nats_pid")
            wait_port "$nats_port"
            return
        fi
        wait "$nats_pid" 2>/dev/null || true
        [ "$attempt" = 1 ] && echo "nats-server cannot listen yet, retrying: $(tail -1 "$work/nats.log")" >&2
        sleep 2
    done
    return 1
}

# start_node NAME PORT MODE: starts a node; its pid in $node_pid, once ready.
start_node() {
    node_config "$1" "$2" "$3"
    # shellcheck disable=SC2086
    env $node_env "$bin/chatd" --config "$work/$1/chatd.toml" 2>"$work/$1.log" &
    node_pid=$!
    pids+=("$node_pid")
    wait_port "$2"
    if [ "$3" = cluster ]; then
        for _ in $(seq 100); do
            "$bin/chatctl" --socket "$work/$1/admin.sock" --json status 2>/dev/null | grep -q '"ready":true' && break
            sleep 0.1
        done
    fi
    sleep 0.5
}

# Stops the nodes first (their users' leaves and name releases reach NATS), then NATS.
stop_all() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
    pids=()
}

args_for() {
    case $1 in
    fanout1000) echo "fanout -c 1000 -s 5 -d 10" ;;
    fanout100) echo "fanout -c 100 -s 10 -d 10" ;;
    latency) echo "fanout -c 101 -s 1 --rate 100 -d 10" ;;
    bus) echo "fanout -c 2 -s 1 -d 10 --window 2000" ;;
    idle5000) echo "idle -c 5000 --join-rate 1000" ;;
    *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}

for case in "${cases[@]}"; do
    args=$(args_for "$case")
    for run in $(seq "$runs"); do
        load=$(cut -d' ' -f1 /proc/loadavg)
        # The cluster: NATS and two nodes.
        start_nats
        start_node a "$port_a" cluster
        pid_a=$node_pid
        start_node b "$port_b" cluster
        pid_b=$node_pid
        addrs=(--addr "127.0.0.1:$port_a,127.0.0.1:$port_b")
        [ "$case" = latency ] && addrs=(--sender-addr "127.0.0.1:$port_a" --addr "127.0.0.1:$port_b")
        # shellcheck disable=SC2086
        "$bin/chat-bench" $args "${addrs[@]}" --pid "$pid_a,$pid_b" \
            --label "$label cluster2 $case run $run load $load" >>"$out" \
            || echo "run cluster $case/$run exited $?" >&2
        stop_all
        # The same case on one node, in the same run.
        if [ "$case" != latency ] && [ "$case" != bus ]; then
            start_node single "$port_a" single
            # shellcheck disable=SC2086
            "$bin/chat-bench" $args --addr "127.0.0.1:$port_a" --pid "$node_pid" \
                --label "$label single $case run $run load $load" >>"$out" \
                || echo "run single $case/$run exited $?" >&2
            stop_all
        fi
    done
done
