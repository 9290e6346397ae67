# shellcheck shell=bash
# Sourced by the benchmark scripts. Run from the repository root.

# Returns once something accepts on port PORT (42069 by default; or after 10 s), then lets
# that probe connection, one short-lived client, leave before anything is measured.
wait_bench_port() {
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/"${1:-42069}") 2>/dev/null && break
        sleep 0.1
    done
    sleep 0.5
}

# Starts CHATD (a chatd binary) on config/bench.toml (or CONFIG, the optional third argument)
# in the background, its log in LOG, and returns once it accepts on port 42069 (or PORT, the
# optional fourth); its pid is then in $chatd_pid.
start_bench_chatd() {
    "$1" --config "${3:-config/bench.toml}" 2>"$2" &
    # shellcheck disable=SC2034 # read by the scripts that source this file
    chatd_pid=$!
    wait_bench_port "${4:-42069}"
}

# Starts REFERENCE (a chat-reference binary) on 127.0.0.1:42069 (or ADDR, the optional third
# argument, a 127.0.0.1 address) in the background, its stderr in LOG, and returns once it
# accepts; its pid is then in $reference_pid.
start_reference() {
    local addr=${3:-127.0.0.1:42069}
    "$1" --listen "$addr" 2>"$2" &
    # shellcheck disable=SC2034 # read by the scripts that source this file
    reference_pid=$!
    wait_bench_port "${addr##*:}"
}
