#!/usr/bin/env bash
# The TLS cases of docs/performance.md beside their plaintext twins, in one run: a fresh release
# chatd per case on config/bench.toml plus a [tls] table on port PORT+1 (a throw-away CA and an
# ECDSA P-256 leaf for 127.0.0.1 made here with openssl), one JSON line per case to OUT.
#
#   cargo build --release --bin chatd --bin chat-bench
#   bench/tls.sh OUT.jsonl [RUNS]      (BIN=DIR: the binaries are in DIR, not target/release)
#
# Cases (each run alternates plaintext and TLS so both see the same machine state):
#   fanout1000      fanout -c 1000 -s 5 -d 10, plaintext then TLS
#   storm2000       idle -c 2000 --join-rate 100000 (every connect started within 20 ms), both
# Needs openssl and two free ports, PORT and PORT+1 (PORT=42069 by default; on a machine shared
# with other benchmarks pick others). Run from the repository root.
set -euo pipefail
out=${1:?usage: bench/tls.sh OUT.jsonl [RUNS]}
runs=${2:-3}
port=${PORT:-42069}
tls_port=$((port + 1))
if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/"$tls_port") 2>/dev/null; then
    echo "port $port or $tls_port is in use; set PORT" >&2
    exit 2
fi
bin=${BIN:-target/release}
# shellcheck source=bench/lib.sh
. bench/lib.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=chatd bench CA" -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$work/privkey.pem" -out "$work/leaf.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$work/ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/leaf.pem" 2>/dev/null
cat "$work/leaf.pem" "$work/ca.pem" >"$work/fullchain.pem"
config="$work/bench-tls.toml"
{
    # Its own ports, admin socket and state, so it never meets another chatd on the machine.
    sed -e "s/^listen = .*42069.*/listen = [\"127.0.0.1:$port\"]/" \
        -e "s|^socket = \"\"|socket = \"$work/admin.sock\"|" \
        -e "s|^state-dir = \"\"|state-dir = \"$work/state\"|" config/bench.toml
    printf '\n[tls]\nlisten = ["127.0.0.1:%s"]\ncertificate = "%s"\nprivate-key = "%s"\n' \
        "$tls_port" "$work/fullchain.pem" "$work/privkey.pem"
} >"$config"

run_case() { # NAME TLS(0/1) ARGS...
    local name=$1 tls=$2
    shift 2
    start_bench_chatd "$bin/chatd" /tmp/chatd-bench-tls.log "$config" "$port"
    if ! kill -0 "$chatd_pid" 2>/dev/null; then
        echo "chatd did not start: $(tail -3 /tmp/chatd-bench-tls.log)" >&2
        exit 1
    fi
    local pid=$chatd_pid addr=127.0.0.1:$port extra=()
    if [ "$tls" = 1 ]; then
        addr=127.0.0.1:$tls_port
        extra=(--ca "$work/ca.pem")
    fi
    "$bin/chat-bench" "$@" --addr "$addr" "${extra[@]}" --pid "$pid" \
        --label "$name run $run load $(cut -d' ' -f1 /proc/loadavg)" >>"$out" ||
        echo "run $name/$run exited $?" >&2
    kill "$pid"
    wait "$pid" || true
}

for run in $(seq "$runs"); do
    run_case fanout1000 0 fanout -c 1000 -s 5 -d 10
    run_case fanout1000-tls 1 fanout -c 1000 -s 5 -d 10
    run_case storm2000 0 idle -c 2000 --join-rate 100000
    run_case storm2000-tls 1 idle -c 2000 --join-rate 100000
done
