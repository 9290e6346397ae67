#!/usr/bin/env bash
# What scraping /metrics every second costs the 1,000-client fan-out (docs/performance.md,
# "Metrics"): RUNS pairs of runs, interleaved, each on a fresh release chatd with config/bench.toml
# plus [metrics] on 127.0.0.1:9469; in one run of each pair curl scrapes every second, in the
# other nothing does. One JSON line per run in OUT, labelled "scrape" or "no-scrape" with the
# load average at its start.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/metrics.sh OUT.jsonl [RUNS]
set -euo pipefail
out=${1:?usage: bench/metrics.sh OUT.jsonl [RUNS]}
runs=${2:-3}
bin=target/release
# shellcheck source=bench/lib.sh
. bench/lib.sh
config=$(mktemp /tmp/chatd-bench-metrics.XXXXXX.toml)
trap 'rm -f "$config"' EXIT
{ cat config/bench.toml; printf '\n[metrics]\nlisten = "127.0.0.1:9469"\n'; } >"$config"

for run in $(seq "$runs"); do
    for mode in no-scrape scrape; do
        start_bench_chatd "$bin/chatd" /tmp/chatd-bench.log "$config"
        pid=$chatd_pid
        scraper=
        if [ "$mode" = scrape ]; then
            (while :; do curl -s -o /dev/null http://127.0.0.1:9469/metrics; sleep 1; done) &
            scraper=$!
        fi
        "$bin/chat-bench" fanout -c 1000 -s 5 -d 10 --pid "$pid" \
            --label "$mode run $run load $(cut -d' ' -f1 /proc/loadavg)" >>"$out" || echo "run $mode/$run exited $?" >&2
        [ -n "$scraper" ] && kill "$scraper"
        kill "$pid"
        wait "$pid" || true
    done
done
