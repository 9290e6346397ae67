#!/usr/bin/env bash
# What scraping /metrics every second costs the 1,000-client fan-out (docs/performance.md,
# "Metrics"): RUNS pairs of runs, interleaved, each on a fresh release chatd with config/bench.toml
# plus [metrics] on 127.0.0.1:9469; in one run of each pair curl scrapes every second, in the
# other nothing does. One JSON line per run in OUT, labelled "scrape" or "no-scrape" with the
# load average at its start. It has its own admin socket and state directory. PORT (42069) and METRICS_PORT (9469) move it off a port in use.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/metrics.sh OUT.jsonl [RUNS]        (BIN=DIR: binaries from another target directory)
set -euo pipefail
out=${1:?usage: bench/metrics.sh OUT.jsonl [RUNS]}
runs=${2:-3}
bin=${BIN:-target/release}
# shellcheck source=bench/lib.sh
. bench/lib.sh
config=$(mktemp /tmp/chatd-bench-metrics.XXXXXX.toml)
port=${PORT:-42069}
mport=${METRICS_PORT:-9469}
state=$(mktemp -d /tmp/chatd-bench-metrics.XXXXXX)
trap 'rm -rf "$config" "$state"' EXIT
# Its own admin socket and state directory, so it never meets another chatd on this machine.
{
    sed -e "s/^listen = \[.*42069.*\]/listen = [\"127.0.0.1:$port\"]/" \
        -e "s|^socket = \"\"|socket = \"$state/admin.sock\"|" \
        -e "s|^state-dir = \"\"|state-dir = \"$state\"|" config/bench.toml
    printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$mport"
} >"$config"

for run in $(seq "$runs"); do
    for mode in no-scrape scrape; do
        start_bench_chatd "$bin/chatd" /tmp/chatd-bench-metrics.log "$config" "$port"
        pid=$chatd_pid
        scraper=
        if [ "$mode" = scrape ]; then
            (while :; do curl -s -o /dev/null "http://127.0.0.1:$mport/metrics"; sleep 1; done) &
            scraper=$!
        fi
        "$bin/chat-bench" fanout --addr "127.0.0.1:$port" -c 1000 -s 5 -d 10 --pid "$pid" \
            --label "$mode run $run load $(cut -d' ' -f1 /proc/loadavg)" >>"$out" || echo "run $mode/$run exited $?" >&2
        [ -n "$scraper" ] && kill "$scraper"
        kill "$pid" 2>/dev/null || true
        wait "$pid" || true
    done
done
