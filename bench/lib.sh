# shellcheck shell=bash
# Sourced by the benchmark scripts. Run from the repository root.

# Starts CHATD (a chatd binary) on config/bench.toml (or CONFIG) in the background, its log in
# LOG, and returns once it accepts on PORT (42069); its pid is then in $chatd_pid.
#   start_bench_chatd CHATD LOG [CONFIG [PORT]]
start_bench_chatd() {
    "$1" --config "${3:-config/bench.toml}" 2>"$2" &
    # shellcheck disable=SC2034 # read by the scripts that source this file
    chatd_pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/${4:-42069}") 2>/dev/null && break
        sleep 0.1
    done
    # The probe connection above is one short-lived client; let it leave before measuring.
    sleep 0.5
}
