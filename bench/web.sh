#!/usr/bin/env bash
# The browser client's transport (WebSocket, `[web]`) beside plain TCP, measured in the same
# chatd so both see the same process and machine state; one JSON line per run to OUT, then a
# summary (ws/tcp ratio of deliveries/s per pair, bytes per idle joined connection).
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/web.sh OUT.jsonl [PAIRS]
#
# Builds nothing: the binaries are taken from BIN (default ${CARGO_TARGET_DIR:-target}/release).
# chatd runs on config/bench.toml with its own ports, admin socket and state directory, plus
# `[web] listen` on PORT+1; PORT defaults to 49069 (pick free ones on a shared machine).
#
# 1. One chatd for the fan-out: PAIRS (default 3) pairs of `fanout -c 1000 -s 5 -d 10`, over TCP
#    and over WebSocket, the order alternating from pair to pair (tcp-ws, ws-tcp, ...).
# 2. Idle memory, IDLE_ROUNDS (default 2) rounds, a fresh chatd each: IDLE (default 3000) clients
#    join over one transport and stay, and once they are seated and measured, IDLE more join over
#    the other on top of them; the first round starts with TCP, the next with WebSocket, and so
#    on. Each run reads its own RSS growth, so both figures come from one daemon, neither
#    reusing memory the other freed.
# FANOUT="-c 100 -s 5 -d 2" IDLE=300 shrink the cases for a quick check of the script itself.
# Run from the repository root.
set -euo pipefail
out=${1:?usage: bench/web.sh OUT.jsonl [PAIRS]}
pairs=${2:-3}
port=${PORT:-49069}
web_port=$((port + 1))
idle=${IDLE:-3000}
# shellcheck disable=SC2206 # the case's arguments, split into words
fanout_args=(${FANOUT:--c 1000 -s 5 -d 10})
idle_rounds=${IDLE_ROUNDS:-2}
join_rate=1000
bin=${BIN:-${CARGO_TARGET_DIR:-target}/release}
for b in chatd chat-bench; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: cargo build --release --bin $b first" >&2; exit 2; }
done
if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/"$web_port") 2>/dev/null; then
    echo "port $port or $web_port is in use; set PORT" >&2
    exit 2
fi
# shellcheck source=bench/lib.sh
. bench/lib.sh
build=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
work=$(mktemp -d)
chatd_pid=
cleanup() {
    [ -n "$chatd_pid" ] && kill "$chatd_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
config="$work/bench-web.toml"
{
    # Its own ports, admin socket and state, so it never meets another chatd on the machine.
    sed -e "s/^listen = .*42069.*/listen = [\"127.0.0.1:$port\"]/" \
        -e "s|^socket = \"\"|socket = \"$work/admin.sock\"|" \
        -e "s|^state-dir = \"\"|state-dir = \"$work/state\"|" config/bench.toml
    printf '\n[web]\nlisten = ["127.0.0.1:%s"]\n' "$web_port"
} >"$config"
log=$work/chatd.log

# Waits (up to 90 s) until no socket on the machine uses PORT or WEB_PORT as its local port:
# ports in the ephemeral range can be held by the clients of the previous run (in TIME_WAIT),
# and then chatd cannot bind them.
wait_ports_free() {
    for _ in $(seq 90); do
        [ -z "$(ss -Htan "( sport = :$port or sport = :$web_port )")" ] && return
        sleep 1
    done
}

# Starts chatd; tries again (up to 10 times) when it could not bind: another program's client
# can take one of the ports as its local port between the check above and chatd's bind.
start_chatd() {
    for _ in $(seq 10); do
        wait_ports_free
        start_bench_chatd "$bin/chatd" "$log" "$config" "$port"
        wait_bench_port "$web_port"
        kill -0 "$chatd_pid" 2>/dev/null && return
        echo "chatd did not start: $(tail -1 "$log")" >&2
        wait "$chatd_pid" || true
    done
    exit 1
}

stop_chatd() {
    kill "$chatd_pid"
    wait "$chatd_pid" || true
    chatd_pid=
}

# The chat-bench arguments that pick TRANSPORT (tcp or ws).
transport_args() {
    if [ "$1" = ws ]; then
        echo "--addr 127.0.0.1:$web_port --websocket"
    else
        echo "--addr 127.0.0.1:$port"
    fi
}

label() { # CASE TRANSPORT N
    echo "web $build case=$1 transport=$2 run=$3 load $(cut -d' ' -f1 /proc/loadavg)"
}

# Server-side connections established on PORT or WEB_PORT.
established() {
    ss -Htn state established "( sport = :$port or sport = :$web_port )" | wc -l
}

fanout() { # TRANSPORT PAIR
    # The last run's clients are gone from chatd too (their names free, their leaves done), so
    # no run pays for the one before it.
    for _ in $(seq 600); do
        [ "$(established)" -eq 0 ] && break
        sleep 0.1
    done
    sleep 1
    # shellcheck disable=SC2046 # word splitting of the transport's arguments is intended
    "$bin/chat-bench" fanout "${fanout_args[@]}" $(transport_args "$1") --pid "$chatd_pid" \
        --label "$(label fanout1000 "$1" "$2")" >>"$out" || echo "fanout $1 pair $2 exited $?" >&2
}

start_chatd
for pair in $(seq "$pairs"); do
    if [ $((pair % 2)) = 1 ]; then
        fanout tcp "$pair"
        fanout ws "$pair"
    else
        fanout ws "$pair"
        fanout tcp "$pair"
    fi
done
stop_chatd

# How long an idle run takes at most: the connect schedule, settling and holding, with room for
# a slow machine. The first transport holds its clients that long past its own measurement, so
# they are all still there while the second one joins and is measured.
storm_s=$(((idle + join_rate - 1) / join_rate))
second_s=$((3 * storm_s + 20))
for round in $(seq "$idle_rounds"); do
    if [ $((round % 2)) = 1 ]; then first=tcp second=ws; else first=ws second=tcp; fi
    start_chatd
    # shellcheck disable=SC2046
    "$bin/chat-bench" idle -c "$idle" --join-rate "$join_rate" $(transport_args "$first") \
        --pid "$chatd_pid" --hold "$second_s" --timeout $((4 * second_s)) \
        --label "$(label "idle$idle-first" "$first" "$round")" >>"$out" &
    first_pid=$!
    # Every first client connected, then its 1 s settle and the RSS reading.
    for _ in $(seq $((10 * second_s))); do
        [ "$(established)" -ge "$idle" ] && break
        sleep 0.1
    done
    sleep 2
    # shellcheck disable=SC2046
    "$bin/chat-bench" idle -c "$idle" --join-rate "$join_rate" $(transport_args "$second") \
        --pid "$chatd_pid" --timeout $((2 * second_s)) --first-name "$idle" \
        --label "$(label "idle$idle-second" "$second" "$round")" >>"$out" ||
        echo "idle $second round $round exited $?" >&2
    wait "$first_pid" || echo "idle $first round $round exited $?" >&2
    stop_chatd
done

# The summary, from this run's lines only.
python3 - "$out" "$build" "${fanout_args[*]}" <<'EOF'
import json, statistics, sys
path, build, fanout_args = sys.argv[1], sys.argv[2], sys.argv[3]
runs = []
for line in open(path):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    words = dict(w.split("=", 1) for w in r.get("label", "").split() if "=" in w)
    if r.get("label", "").startswith(f"web {build} "):
        runs.append((words, r))
fan = {}
for w, r in runs:
    if w.get("case") == "fanout1000":
        fan.setdefault(w["run"], {})[w["transport"]] = r
print(f"fan-out ({fanout_args}), deliveries/s (steal %):")
ratios = []
for pair, t in sorted(fan.items(), key=lambda kv: int(kv[0])):
    if "tcp" in t and "ws" in t:
        a, b = t["tcp"]["deliveries_per_s"], t["ws"]["deliveries_per_s"]
        ratio = b / a if a else 0
        clean = all(x["lost"] == 0 and x["reordered"] == 0 and x["duplicated"] == 0
                    and x["orders_seen"] <= 1 and x["errors"] == 0 and x["disconnected"] == 0
                    and not x["timed_out"] for x in t.values())
        print(f"  pair {pair}: tcp {a:,.0f} ({t['tcp']['steal_pct']}), "
              f"ws {b:,.0f} ({t['ws']['steal_pct']}), ws/tcp {ratio:.2f}"
              f"{'' if clean else '  NOT CLEAN: not counted'}")
        if clean:
            ratios.append(ratio)
if ratios:
    print(f"  median ws/tcp {statistics.median(ratios):.2f} (target >= 0.70)")
print(f"idle, RSS per idle joined connection (bytes):")
for w, r in runs:
    if w.get("case", "").startswith("idle"):
        s = r.get("server") or {}
        print(f"  round {w['run']} {w['case'].split('-')[1]:6} {w['transport']:3}: "
              f"{s.get('rss_per_conn_bytes')} B, seated {r['seated']}/{r['clients']}, "
              f"still open {r['still_open']}, steal {r['steal_pct']}"
              f"{'' if w['transport'] == 'tcp' else ' (target <= 12,288 B)'}")
EOF
