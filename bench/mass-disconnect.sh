#!/usr/bin/env bash
# A mass disconnect: N clients join (`chat-bench idle`, held 1 s) and then all close at once as
# chat-bench exits. Prints one JSON line: chatd's CPU time and wall time from then until its CPU
# use settles (unchanged over 4 × 0.5 s, which are not counted), its peak RSS (VmHWM) and its RSS
# afterwards, plus the storm's own figures.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/mass-disconnect.sh CHATD N LABEL >>OUT.jsonl
#
# Needs port 42069 free; CHATD is a chatd binary (target/release/chatd, or an older build).
set -euo pipefail
chatd=$(realpath "${1:?usage: bench/mass-disconnect.sh CHATD N LABEL}")
n=${2:?number of clients}
label=${3:-}
cd "$(dirname "$0")/.."
storm=$(mktemp)
trap 'rm -f "$storm"' EXIT
# shellcheck source=bench/lib.sh
. bench/lib.sh
start_bench_chatd "$chatd" /dev/null
pid=$chatd_pid
target/release/chat-bench idle -c "$n" --join-rate 1000 --timeout 600 --hold 1 --pid "$pid" \
    --label "$label" >"$storm"
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$pid/stat"; }
c0=$(cpu)
t0=$(date +%s.%N)
last=$c0
stable=0
while [ "$stable" -lt 4 ]; do
    sleep 0.5
    c=$(cpu)
    if [ "$c" == "$last" ]; then stable=$((stable + 1)); else stable=0; fi
    last=$c
done
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
kill "$pid"
wait "$pid" || true
python3 - "$storm" "$label" "$n" "$c0" "$last" "$t0" "$t1" "$hwm" "$rss" <<'PY'
import json, sys
storm, label, n, c0, c1, t0, t1, hwm, rss = sys.argv[1:]
d = json.load(open(storm))
print(json.dumps({
    "label": label, "clients": int(n),
    "storm_peak_kib": d["server"]["rss_peak_kib"],
    "rss_per_conn": d["server"]["rss_per_conn_bytes"],
    "disconnect_cpu_s": round(float(c1) - float(c0), 2),
    "disconnect_wall_s": round(float(t1) - float(t0) - 2, 1),
    "vmhwm_kib": int(hwm), "rss_after_kib": int(rss), "steal": d["steal_pct"],
}))
PY
