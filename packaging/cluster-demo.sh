#!/usr/bin/env bash
# A local chatd cluster in one command (docs/cluster.md, "Run it on one machine"): a nats-server
# with JetStream in a temporary store, and two chatd nodes, "a" and "b", serving one room on
# ports 42069 and 42079 of 127.0.0.1, with their admin sockets, configs and logs in
# /tmp/chatd-demo/a and /tmp/chatd-demo/b. Ctrl-C stops all three and deletes the NATS store.
#
#   cargo build --release --bin chatd --bin chatctl --bin chat-client
#   packaging/cluster-demo.sh [NATS_PORT]      # default: a free port nats-server picks
#
# Environment: CHATD_BIN_DIR (default target/release, under $CARGO_TARGET_DIR when set),
# NATS_SERVER (default: nats-server from PATH), CHATD_DEMO_PORTS (default "42069 42079").
# Needs no root. Only one demo runs at a time (it owns /tmp/chatd-demo).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CHATD_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
NATS=${NATS_SERVER:-nats-server}
NATS_PORT=${1:--1} # -1: nats-server picks a free port and logs it
read -r PORT_A PORT_B <<<"${CHATD_DEMO_PORTS:-42069 42079}"
DEMO=/tmp/chatd-demo

die() { echo "cluster-demo: $*" >&2; exit 1; }
for b in chatd chatctl; do
    [ -x "$BIN/$b" ] || die "no $BIN/$b: cargo build --release (or set CHATD_BIN_DIR)"
done
command -v "$NATS" >/dev/null || die "no $NATS: apt-get install nats-server (or set NATS_SERVER)"
for p in "$PORT_A" "$PORT_B"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p is taken (another demo or chatd?); set CHATD_DEMO_PORTS"
    fi
done

pids=()
STORE=
cleanup() {
    trap - EXIT INT TERM
    local p
    # The nodes first, so their users see the shutdown and their leaves reach NATS.
    for p in "${pids[@]:1}" "${pids[0]:-}"; do
        [ -n "$p" ] && kill -TERM "$p" 2>/dev/null
    done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -n "$STORE" ] && rm -rf "$STORE"
    rm -f "$DEMO"/a/admin.sock "$DEMO"/b/admin.sock
    echo "cluster-demo: stopped (logs in $DEMO/*/*.log)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$DEMO"
mkdir -p "$DEMO/a/state" "$DEMO/b/state"
STORE=$(mktemp -d /tmp/chatd-demo-nats.XXXXXX)

# NATS with JetStream, on 127.0.0.1 only. The log exists before the loop reads it.
: >"$DEMO/nats.log"
"$NATS" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$STORE" >"$DEMO/nats.log" 2>&1 &
pids+=($!)
url=
for _ in $(seq 100); do
    url=$(sed -n 's/.*Listening for client connections on \([0-9.]*:[0-9]*\).*/nats:\/\/\1/p' "$DEMO/nats.log")
    [ -n "$url" ] && break
    kill -0 "${pids[0]}" 2>/dev/null || break
    sleep 0.1
done
[ -n "$url" ] || { cat "$DEMO/nats.log" >&2; die "nats-server did not start"; }

# node NAME PORT: writes NAME's config and starts it.
node() {
    local name=$1 port=$2 dir=$DEMO/$1
    cat >"$dir/chatd.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
state-dir = "$dir/state"

[admin]
socket = "$dir/admin.sock"

[cluster]
nats = ["$url"]
node = "$name"
name = "demo"
EOF
    "$BIN/chatd" --config "$dir/chatd.toml" >"$dir/chatd.log" 2>&1 &
    pids+=($!)
}
node a "$PORT_A"
node b "$PORT_B"

# Ready: the node follows the room (chatctl status says so), which chatd reaches only once it
# has joined the stream through NATS.
ready() {
    local s
    s=$("$BIN/chatctl" --socket "$DEMO/$1/admin.sock" status 2>/dev/null) && [[ $s == *"following the room"* ]]
}
for n in a b; do
    for _ in $(seq 300); do
        ready "$n" && break
        sleep 0.1
    done
    ready "$n" || { tail -n 20 "$DEMO/$n/chatd.log" >&2; die "node $n is not following the room after 30 s"; }
done

client=$BIN/chat-client
[ -x "$client" ] || client=chat-client
cat <<EOF
cluster-demo: NATS at $url (store $STORE), one room "demo" on two nodes:
  node a: 127.0.0.1:$PORT_A   admin socket $DEMO/a/admin.sock   log $DEMO/a/chatd.log
  node b: 127.0.0.1:$PORT_B   admin socket $DEMO/b/admin.sock   log $DEMO/b/chatd.log

Chat through either node (each in its own terminal):
  $client 127.0.0.1 $PORT_A
  $client 127.0.0.1 $PORT_B          (or: nc 127.0.0.1 $PORT_B)
Who is where, and the cluster's state:
  $BIN/chatctl --socket $DEMO/a/admin.sock list
  $BIN/chatctl --socket $DEMO/b/admin.sock status

Ctrl-C stops all three.
EOF

# Until Ctrl-C, or until one of the three ends on its own (then everything stops).
set +e
wait -n "${pids[@]}"
echo "cluster-demo: a process ended on its own; see $DEMO/nats.log and $DEMO/*/chatd.log" >&2
exit 1
