#!/usr/bin/env bash
# Proves the chatd Debian package under a real systemd: for each Debian release, boots a
# minimal rootfs with systemd as PID 1 in systemd-nspawn, installs the .deb given on the
# command line and drives the service the way an admin would. Prints PASS/FAIL per check,
# never skips one, and exits 1 if anything failed.
#
#   packaging/test-systemd.sh target/debian/chatd_*.deb
#   packaging/test-systemd.sh --prepare      # only make the rootfs (all releases at once)
#
# Builds nothing: the .deb under test is the one CI built in the same run (.ci/systemd.sh).
# Needs root, systemd-nspawn (systemd-container) and debootstrap. The rootfs of each release
# is made once with debootstrap and kept outside the checkout (CHATD_ROOTFS_DIR, default
# /var/tmp, as chatd-rootfs-RELEASE); every boot runs on a throwaway overlay of it
# (--volatile=overlay), so the cached tree stays pristine and one run cannot leak into the next.
# The container has its own network namespace (only `lo`), so port 42069 inside it never
# collides with anything on the host.
#
# Environment: CHATD_TEST_RELEASES (default "bookworm trixie": systemd 252, Type=notify +
# ExecReload; systemd 257, Type=notify-reload), CHATD_ROOTFS_DIR, CHATD_MIRROR (default: the
# .../debian URI already configured in /etc/apt/sources.list*), CHATD_TEST_KEEP=1 keeps the
# work directory with console and journal logs.
set -uo pipefail

DEB=${1:?usage: packaging/test-systemd.sh PATH/TO/chatd_VERSION_ARCH.deb | --prepare}
RELEASES=${CHATD_TEST_RELEASES:-bookworm trixie}
ROOTFS_DIR=${CHATD_ROOTFS_DIR:-/var/tmp}
PORT=42069
# Packages the rootfs needs besides minbase: systemd as init, dbus for systemctl/systemd-run,
# libnss-systemd so DynamicUser= names resolve, procps for /bin/kill (ExecReload=), passwd
# for useradd, nats-server (Debian's own package) for the cluster case.
INCLUDE=systemd,systemd-sysv,dbus,libnss-systemd,procps,passwd,nats-server

[ "$(id -u)" = 0 ] || { echo "test-systemd.sh: needs root (nspawn, debootstrap)" >&2; exit 2; }
[ "$DEB" = --prepare ] || [ -f "$DEB" ] || { echo "test-systemd.sh: no such package: $DEB" >&2; exit 2; }
for tool in systemd-nspawn debootstrap nsenter timeout mkfifo; do
    command -v "$tool" >/dev/null || { echo "test-systemd.sh: $tool is missing" >&2; exit 2; }
done
[ "$DEB" = --prepare ] || DEB=$(readlink -f "$DEB")

WORK=$(mktemp -d /var/tmp/chatd-test.XXXXXX)
FAILS=0
PASSES=0
NSPAWN_PID=
PID1=
declare -A CLIENT_FD=() CLIENT_PID=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cleanup() {
    close_all_clients
    stop_container
    if [ "${CHATD_TEST_KEEP:-0}" = 1 ]; then
        log "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Results

CURRENT=
pass() { PASSES=$((PASSES + 1)); printf 'PASS [%s] %s\n' "$REL" "$CURRENT"; }
fail() {
    FAILS=$((FAILS + 1))
    printf 'FAIL [%s] %s: %s\n' "$REL" "$CURRENT" "$*"
}

# check NAME FUNCTION [ARGS...]: runs one check; the function returns non-zero with a reason
# on stdout when it fails. A check is never skipped: if what it depends on is broken, it fails.
# Runs in this shell, not a subshell: the clients a check opens must outlive it.
check() {
    CURRENT=$1
    shift
    if "$@" >"$WORK/check.out" 2>&1; then
        sed 's/^/    /' "$WORK/check.out"
        pass
    else
        fail "$(tail -n 15 "$WORK/check.out")"
    fi
}

# ---------------------------------------------------------------------------------------------
# The rootfs and the container

mirror() {
    if [ -n "${CHATD_MIRROR:-}" ]; then
        echo "$CHATD_MIRROR"
        return
    fi
    # deb822 "URIs:" lines and one-line "deb URI suite" lines; the first .../debian archive.
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
        2>/dev/null |
        sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?//p' |
        tr -s '[:blank:]' '\n' | grep -E '^(https?|file)://.*/debian/?$' | head -n 1
}

# rootfs RELEASE: prints the path of a ready rootfs, making it with debootstrap when missing.
rootfs() {
    local rel=$1 dir="$ROOTFS_DIR/chatd-rootfs-$1" stamp
    stamp="$dir/.chatd-rootfs"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$INCLUDE" ]; then
        echo "$dir"
        return
    fi
    local m
    m=$(mirror)
    [ -n "$m" ] || { echo "no Debian mirror in /etc/apt/sources.list* (set CHATD_MIRROR)" >&2; return 1; }
    local attempt
    for attempt in 1 2; do
        # --one-file-system: an interrupted debootstrap can leave /proc or /sys mounted inside.
        rm -rf --one-file-system "$dir" "$dir.tmp"
        log "debootstrap $rel (minbase + $INCLUDE), attempt $attempt" >&2
        timeout 600 debootstrap --variant=minbase --include="$INCLUDE" "$rel" "$dir.tmp" "$m" \
            >"$WORK/debootstrap-$rel.log" 2>&1 && break
        tail -n 20 "$WORK/debootstrap-$rel.log" >&2
        [ "$attempt" = 2 ] && return 1
    done
    rm -f "$dir.tmp"/var/cache/apt/archives/*.deb
    # nats-server's postinst enables its unit; in the test it is started only by the chatd
    # nodes' Wants=nats-server.service (the cluster case), so the other checks run as before.
    systemctl --root="$dir.tmp" disable nats-server.service >/dev/null 2>&1 || return 1
    # Only a finished tree is ever used as a cache.
    echo "$INCLUDE" >"$dir.tmp/.chatd-rootfs"
    mv "$dir.tmp" "$dir"
    echo "$dir"
}

# boot ROOTFS: starts the container and waits until its systemd reports the system running.
boot() {
    local dir=$1 machine="chatd-test-$REL-$$"
    # --register=no --keep-unit: there is no host systemd to register with; a read-only
    # console, so PID 1 never blocks on a full pty; bpf allowed, so IPAddressDeny= and
    # DevicePolicy= are really enforced inside; cgroup v2 inside, which newer systemd expects.
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn --boot --directory="$dir" \
        --machine="$machine" --register=no --keep-unit --console=read-only \
        --system-call-filter=bpf --volatile=overlay --private-network \
        --bind-ro="$(dirname "$DEB")":/mnt/chatd-deb \
        </dev/null >"$WORK/console-$REL.log" 2>&1 &
    NSPAWN_PID=$!
    local deadline=$((SECONDS + 30))
    while [ -z "$PID1" ] && [ $SECONDS -lt $deadline ]; do
        kill -0 "$NSPAWN_PID" 2>/dev/null || break
        PID1=$(pgrep -P "$NSPAWN_PID" -x systemd | head -n 1)
        [ -n "$PID1" ] || sleep 0.2
    done
    if [ -z "$PID1" ]; then
        echo "the container's systemd did not start; console:"
        tail -n 20 "$WORK/console-$REL.log"
        return 1
    fi
    # PID 1 exists before its control socket does: systemctl fails with "Failed to connect to
    # bus" when asked too early.
    wait_for 60 ct test -S /run/systemd/private || { echo "systemd's control socket never appeared"; return 1; }
    local state
    state=$(ct -t 120 systemctl is-system-running --wait)
    echo "systemd $(ct systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p'), system $state"
    case $state in
    running | degraded) return 0 ;;
    *) return 1 ;;
    esac
}

stop_container() {
    [ -n "$NSPAWN_PID" ] || return 0
    kill -TERM "$NSPAWN_PID" 2>/dev/null
    local deadline=$((SECONDS + 15))
    while kill -0 "$NSPAWN_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null # a second SIGTERM forces it
        sleep 2
        kill -KILL "$NSPAWN_PID" 2>/dev/null
    fi
    wait "$NSPAWN_PID" 2>/dev/null
    NSPAWN_PID=
    PID1=
}

# ct [-t SECONDS] CMD...: runs CMD in the container (all its namespaces) with a clean
# environment, bounded by a timeout (default 60 s: generous, for a machine under load). Runs with the host's capabilities in the
# host's cgroup: anything that must run as a real user goes through as_user.
ct() {
    local t=60
    if [ "$1" = -t ]; then t=$2; shift 2; fi
    [ -n "$PID1" ] || { echo "(no container)"; return 125; }
    timeout "$t" nsenter -t "$PID1" -a \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER=cat "$@" </dev/null
}

# as_user USER CMD...: runs CMD as a real unit of the container's systemd with USER's
# identity and groups, so permission checks see what a logged-in user would be.
as_user() {
    local user=$1
    shift
    ct systemd-run --quiet --wait --pipe --collect -p User="$user" -- "$@"
}

unit() { ct systemctl show -P "$1" chatd.service; }
is_active() { [ "$(unit ActiveState)" = active ]; }

# wait_for SECONDS CMD...: polls CMD every 0.1 s until it succeeds or the time is up.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------------------------
# Plain TCP clients: bash's /dev/tcp in the container's network namespace. Each client's input
# is a FIFO this script holds open; everything it receives goes to WORK/NAME.out, followed by
# "[[closed]]" once the server closes the connection.

# client_open NAME [PORT]: PORT defaults to chatd.service's $PORT.
client_open() {
    local name=$1 port=${2:-$PORT} in="$WORK/$1.in" out="$WORK/$1.out"
    rm -f "$in"
    mkfifo "$in"
    : >"$out"
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 300 nsenter -t "$PID1" -n bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || { echo "[[connect-failed]]"; exit 1; }
        { cat <&3; echo "[[closed]]"; } &
        cat <"$2" >&3
        wait' _ "$port" "$in" >"$out" 2>&1 &
    CLIENT_PID[$name]=$!
    local fd
    exec {fd}<>"$in" # read-write: opening never blocks, and keeps the FIFO's writer alive
    CLIENT_FD[$name]=$fd
}

client_send() { printf '%s\n' "$2" >&"${CLIENT_FD[$1]}"; }

saw() { grep -qF -- "$2" "$WORK/$1.out"; }

# mark NAME: how many lines NAME has received so far; since NAME MARK: what came after.
mark() { wc -l <"$WORK/$1.out"; }
since() { tail -n +"$(($2 + 1))" "$WORK/$1.out"; }

# still_connected MARK_BOB MARK_DAVE: neither bob nor dave lost its connection, nor saw anyone
# leave, since the marks.
still_connected() {
    if since bob "$1" | grep -e '\[\[closed\]\]' -e '^\*\*\* LEAVE' ||
        since dave "$2" | grep -e '\[\[closed\]\]' -e '^\*\*\* LEAVE'; then
        echo "someone was disconnected by the reload (above)"
        return 1
    fi
}

client_wait() {
    if ! wait_for "${4:-20}" saw "$1" "$2"; then
        echo "$1 never received \"$2\"${3:+ ($3)}; it got:"
        sed 's/^/      /' "$WORK/$1.out"
        return 1
    fi
}

# client_join NAME [PORT]: connects and picks the name NAME; fails unless welcomed.
client_join() {
    client_open "$1" "${2:-$PORT}"
    client_wait "$1" "*** HELLO" "on connect" || return 1
    client_send "$1" "$1"
    client_wait "$1" "*** WELCOME $1" "after sending the name"
}

close_client() {
    local name=$1
    [ -n "${CLIENT_FD[$name]:-}" ] || return 0
    local fd=${CLIENT_FD[$name]}
    exec {fd}>&-
    kill "${CLIENT_PID[$name]}" 2>/dev/null
    wait "${CLIENT_PID[$name]}" 2>/dev/null
    unset "CLIENT_FD[$name]" "CLIENT_PID[$name]"
}

close_all_clients() {
    local name
    for name in "${!CLIENT_FD[@]}"; do close_client "$name"; done
}

# ---------------------------------------------------------------------------------------------
# The checks, in the order an admin meets them. Each leaves chatd in a known state or the
# next one puts it there itself.

CONF=/etc/chatd/chatd.toml

t_install() {
    ct -t 300 dpkg -i /mnt/chatd-deb/"$(basename "$DEB")" >"$WORK/dpkg-$REL.log" 2>&1 ||
        { cat "$WORK/dpkg-$REL.log"; return 1; }
    ct getent group chatadm >/dev/null || { echo "group chatadm was not created"; return 1; }
    local f
    for f in /usr/sbin/chatd /usr/bin/chatctl /usr/bin/chat-client \
        /usr/lib/systemd/system/chatd.service /usr/lib/systemd/system/chatd.socket \
        /usr/lib/sysusers.d/chatd.conf /usr/lib/systemd/system-generators/chatd-systemd-generator \
        /usr/share/man/man8/chatd.8.gz /usr/share/man/man8/chatctl.8.gz \
        /usr/share/man/man8/chatctl-kick.8.gz /usr/share/man/man1/chat-client.1.gz \
        /usr/share/bash-completion/completions/chatctl /usr/share/zsh/vendor-completions/_chatctl \
        /usr/share/fish/vendor_completions.d/chatctl.fish; do
        ct test -s "$f" || { echo "$f is missing or empty"; return 1; }
    done
    # No `| grep -q` on a command's output anywhere here: with pipefail, grep exiting at the
    # first match can fail the writer with EPIPE (chatctl even panics on it).
    local conffiles
    # shellcheck disable=SC2016 # a dpkg-query format, not a shell expansion
    conffiles=$(ct dpkg-query -W -f='${Conffiles}\n' chatd)
    [[ $conffiles == *"$CONF "* ]] || { echo "$CONF is not a conffile: $conffiles"; return 1; }
}

t_nothing_enabled() {
    local u s
    for u in chatd.service chatd.socket; do
        s=$(ct systemctl is-enabled "$u")
        [ "$s" = disabled ] || { echo "$u is $s after installation, want disabled"; return 1; }
        s=$(ct systemctl is-active "$u")
        [ "$s" = inactive ] || { echo "$u is $s after installation, want inactive"; return 1; }
    done
}

t_reload_path() {
    local type exec_reload
    type=$(unit Type)
    exec_reload=$(unit ExecReload)
    echo "Type=$type ExecReload=${exec_reload:-(none)}"
    if [ "$SYSTEMD_VERSION" -ge 253 ]; then
        [ "$type" = notify-reload ] || { echo "systemd $SYSTEMD_VERSION: want Type=notify-reload"; return 1; }
        [ -z "$exec_reload" ] || { echo "notify-reload must not also run ExecReload"; return 1; }
    else
        [ "$type" = notify ] || { echo "systemd $SYSTEMD_VERSION: want Type=notify"; return 1; }
        [[ $exec_reload == *"/bin/kill"*"-HUP"* ]] || { echo "want ExecReload=/bin/kill -HUP"; return 1; }
    fi
}

t_security() {
    # The installed unit with the generator's drop-in, as this systemd sees it.
    ct systemd-analyze security --threshold=20 chatd.service >"$WORK/security-$REL.txt" 2>&1 ||
        { tail -n 25 "$WORK/security-$REL.txt"; return 1; }
    tail -n 1 "$WORK/security-$REL.txt"
}

t_start() {
    # With Type=notify, `systemctl start` returns only after chatd's READY=1: so everything
    # must work at once, without any waiting here.
    local t0=$SECONDS
    ct systemctl start chatd || { ct journalctl -u chatd -n 20 --no-pager; return 1; }
    echo "systemctl start returned after $((SECONDS - t0)) s"
    [ "$(ct systemctl is-active chatd)" = active ] || { echo "not active right after start"; return 1; }
    ct bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" || { echo "port $PORT not accepting right after start"; return 1; }
    ct chatctl status >/dev/null || { echo "admin socket not answering right after start"; return 1; }
    # And in the journal, chatd was ready before systemd called it started.
    local order
    order=$(ct journalctl -u chatd --no-pager -o cat | grep -n -e 'admin socket ready' -e 'Started chatd.service')
    [[ $order == *"admin socket ready"*"Started chatd.service"* ]] ||
        { echo "systemd reported chatd started before chatd was ready: $order"; return 1; }
    local status
    status=$(unit StatusText)
    echo "status: $status"
    [[ $status == *online* ]] || { echo "no STATUS= line from chatd"; return 1; }
}

t_chat() {
    client_join bob || return 1
    client_join carol || return 1
    client_send bob "hi from bob"
    client_wait carol "bob: hi from bob" || return 1
    # chat-client in pipe mode, as the README shows it, from the package.
    local out
    out=$(ct -t 60 sh -c "printf 'alice\nhello from chat-client\n' | chat-client 127.0.0.1 $PORT" 2>&1) ||
        { echo "chat-client failed: $out"; return 1; }
    client_wait bob "alice: hello from chat-client" || return 1
    client_wait carol "alice: hello from chat-client" || return 1
    [[ $out == *"bob: hi from bob"* ]] || { echo "chat-client did not show the room's history: $out"; return 1; }
}

t_chatctl_admin() {
    ct useradd --no-create-home --groups chatadm opal || return 1
    ct useradd --no-create-home mallory || return 1
    local out
    out=$(as_user opal chatctl list) || { echo "opal (chatadm): chatctl list failed: $out"; return 1; }
    [[ $out == *bob* && $out == *carol* ]] || { echo "list lacks bob/carol: $out"; return 1; }
    as_user opal chatctl announce "maintenance at noon" >/dev/null || return 1
    client_wait bob "*** NOTICE maintenance at noon" || return 1
    as_user opal chatctl kick carol --reason "testing kicks" >/dev/null || return 1
    client_wait carol "*** KICKED" || return 1
    client_wait carol "[[closed]]" "after the kick" || return 1
    client_wait bob "*** KICK carol was kicked" || return 1
    close_client carol
}

# Two layers refuse mallory: the kernel (the socket is 0660, group chatadm), and, with the
# socket opened to everyone (admin.mode = 0o666, a live key), chatd's own peer-credential
# check, which must still see through the sandbox that opal is in chatadm and mallory is not.
t_chatctl_refused() {
    mallory_refused "socket mode 0660" || return 1
    ct sed -i 's/^mode = 0o660/mode = 0o666/' "$CONF" || return 1
    reload_and_settle "$(reload_count)" >/dev/null || { echo "reload to admin.mode 0o666 failed"; return 1; }
    local mode
    mode=$(ct stat -c %a /run/chatd/chatd.sock)
    [ "$mode" = 666 ] || { echo "socket mode is $mode after the reload, want 666"; return 1; }
    mallory_refused "socket mode 0666, chatd's own check" || return 1
    grep -q 'not root, the daemon.s user, or in group "chatadm"' "$WORK/mallory.out" ||
        { echo "the refusal did not come from chatd:"; cat "$WORK/mallory.out"; return 1; }
    as_user opal chatctl status >/dev/null || { echo "opal refused with mode 0o666"; return 1; }
    ct sed -i 's/^mode = 0o666/mode = 0o660/' "$CONF" || return 1
    reload_and_settle "$(reload_count)" >/dev/null
}

mallory_refused() {
    local cmd code
    for cmd in "list" "announce nope" "kick bob"; do
        # shellcheck disable=SC2086 # word-split on purpose
        as_user mallory chatctl $cmd >"$WORK/mallory.out" 2>&1
        code=$?
        [ "$code" = 4 ] || { echo "$1: mallory's chatctl $cmd exited $code, want 4 (permission denied)"; cat "$WORK/mallory.out"; return 1; }
    done
    grep -qi "permission denied" "$WORK/mallory.out" || { cat "$WORK/mallory.out"; return 1; }
    echo "$1: $(cat "$WORK/mallory.out")"
    saw bob "nope" && { echo "mallory's announce reached bob"; return 1; }
    saw bob "*** KICKED" && { echo "mallory kicked bob"; return 1; }
    return 0
}

# reload_and_settle: `systemctl reload chatd`, then wait until the reload is over. With
# Type=notify-reload systemctl itself waits for chatd's READY=1; with Type=notify + ExecReload
# (systemd 252) it returns once `kill -HUP` has, so this waits for the journal's verdict.
reload_and_settle() {
    local before=$1
    ct systemctl reload chatd || return 1
    if [ "$SYSTEMD_VERSION" -ge 253 ]; then
        # notify-reload: systemctl returned after chatd's READY=1, which chatd sends once the
        # new config is live; callers check that at once, without waiting for anything.
        echo "systemctl reload returned on chatd's READY=1 (notify-reload)"
    else
        wait_for 30 reload_logged "$before" || { echo "no reload verdict in the journal"; return 1; }
        echo "kill -HUP sent (Type=notify + ExecReload); chatd's verdict polled from the journal"
    fi
    wait_for 30 is_active
}

reload_logged() {
    [ "$(ct journalctl -u chatd --no-pager -o cat | grep -c 'config reload')" -gt "$1" ]
}

reload_count() { ct journalctl -u chatd --no-pager -o cat | grep -c 'config reload'; }

t_reload() {
    client_join dave || return 1
    local mb md
    mb=$(mark bob)
    md=$(mark dave)
    ct sed -i 's/^motd = .*/motd = "reloaded motd, nobody dropped"/' "$CONF" || return 1
    local n
    n=$(reload_count)
    reload_and_settle "$n" || return 1
    # Under notify-reload the new config is live the moment systemctl returns.
    client_join erin || return 1
    client_wait erin "*** MOTD reloaded motd, nobody dropped" "right after the reload" || return 1
    client_send bob "still here after reload"
    client_wait dave "bob: still here after reload" || return 1
    still_connected "$mb" "$md" || return 1
    ct journalctl -u chatd --no-pager -o cat | grep 'config reloaded' | tail -n 1
}

# The broken file is put back whatever happens, so the checks after this one start from a
# good config.
t_broken_reload() {
    ct cp "$CONF" /root/chatd.toml.good || return 1
    broken_reload
    local rc=$?
    ct cp /root/chatd.toml.good "$CONF" || return 1
    return $rc
}

broken_reload() {
    local mb md
    mb=$(mark bob)
    md=$(mark dave)
    ct sh -c "printf '\n[room]\nhistory = \"many\"\n' >> $CONF" || return 1
    local n
    n=$(reload_count)
    reload_and_settle "$n" >/dev/null 2>&1
    echo "systemctl reload exited $? on the broken file"
    wait_for 30 reload_logged "$n" || { echo "no reload verdict in the journal"; return 1; }
    wait_for 30 is_active ||
        { echo "chatd is $(unit ActiveState) after a broken reload"; return 1; }
    local err
    # The reason is in the record's CHAT_ERROR field (journalctl -o verbose shows it).
    err=$(ct journalctl -u chatd -p err -n 1 --no-pager -o verbose | grep -E '^ *(MESSAGE|CHAT_ERROR)=')
    echo "journalctl -u chatd -p err:"
    printf '%s\n' "$err"
    [[ $err == *"config reload failed"* && $err == *"chatd.toml:"* ]] ||
        { echo "want the failed reload with the file's position in journalctl -u chatd -p err"; return 1; }
    client_send bob "alive after a broken edit"
    client_wait dave "bob: alive after a broken edit" || return 1
    still_connected "$mb" "$md"
}

# Installing the package again is dpkg's upgrade path (postinst configure OLD-VERSION): the
# admin's edit of the conffile stays, and a running chatd is restarted on the new binaries.
t_upgrade() {
    local pid
    pid=$(main_pid)
    ct -t 300 dpkg -i /mnt/chatd-deb/"$(basename "$DEB")" >"$WORK/dpkg-upgrade-$REL.log" 2>&1 ||
        { cat "$WORK/dpkg-upgrade-$REL.log"; return 1; }
    ct grep -q '^motd = "reloaded motd, nobody dropped"' "$CONF" ||
        { echo "the local edit of $CONF was lost"; return 1; }
    wait_for 30 restarted_since "$pid" || { echo "chatd was not restarted: MainPID $(main_pid)"; return 1; }
    client_wait bob "[[closed]]" "when chatd restarted" || return 1
    close_all_clients
    client_join bob || return 1
    client_wait bob "*** MOTD reloaded motd, nobody dropped" "after the upgrade" || return 1
    client_join dave
}

t_purge() {
    ct systemctl start chatd.socket chatd.service || return 1
    ct -t 300 dpkg --purge chatd >"$WORK/dpkg-purge-$REL.log" 2>&1 || { cat "$WORK/dpkg-purge-$REL.log"; return 1; }
    local u s
    for u in chatd.service chatd.socket; do
        s=$(ct systemctl is-active "$u")
        [ "$s" = inactive ] || { echo "$u is $s after purge"; return 1; }
    done
    ct test ! -e /usr/sbin/chatd || { echo "/usr/sbin/chatd still there"; return 1; }
    ct test ! -e "$CONF" || { echo "$CONF still there after purge"; return 1; }
}

t_journal_fields() {
    local out
    out=$(ct journalctl -u chatd CHAT_USER=bob --no-pager -o cat)
    [ -n "$out" ] || { echo "no journal records with CHAT_USER=bob"; return 1; }
    echo "$out" | head -n 1
}

t_stop() {
    local t0=$SECONDS
    ct -t 60 systemctl stop chatd || return 1
    echo "systemctl stop took $((SECONDS - t0)) s"
    client_wait bob "*** SHUTDOWN" || return 1
    client_wait bob "[[closed]]" "after the shutdown notice" || return 1
    local state result
    state=$(unit ActiveState)
    result=$(unit Result)
    if [ "$state" != inactive ] || [ "$result" != success ]; then
        echo "after stop: ActiveState=$state Result=$result, want inactive/success"
        return 1
    fi
    ct test ! -e /run/chatd/chatd.sock || { echo "admin socket left behind"; return 1; }
    close_all_clients
}

# chatd.socket is stopped again whatever happens, so later checks see a plain service.
t_socket_activation() {
    socket_activation
    local rc=$?
    ct -t 60 systemctl stop chatd.socket chatd.service
    close_all_clients
    return $rc
}

socket_activation() {
    ct systemctl start chatd.socket ||
        { ct systemctl status chatd.socket; ct journalctl -u chatd.socket -n 5 --no-pager; return 1; }
    [ "$(ct systemctl is-active chatd.service)" = inactive ] || { echo "chatd started before any client"; return 1; }
    client_join frank || return 1
    [ "$(ct systemctl is-active chatd.service)" = active ] || { echo "chatd.service not active"; return 1; }
    local journal list
    journal=$(ct journalctl -u chatd --no-pager -o cat)
    [[ $journal == *"socket activation: serving the sockets"* ]] ||
        { echo "chatd did not say it adopted the passed socket"; return 1; }
    list=$(ct chatctl list)
    [[ $list == *frank* ]] || { echo "chatctl list lacks frank: $list"; return 1; }
    ct -t 60 systemctl stop chatd.socket chatd.service || { echo "systemctl stop failed"; return 1; }
    client_wait frank "*** SHUTDOWN"
}

main_pid() { unit MainPID; }
restarted_since() { local p; p=$(main_pid); [ "$p" != 0 ] && [ "$p" != "$1" ] && [ "$(unit ActiveState)" = active ]; }

# Sends SIG to chatd's main process and waits up to LIMIT s for systemd to replace it; prints
# the seconds that took, or why it failed.
signal_and_wait_restart() {
    local sig=$1 limit=$2 pid t0=$SECONDS
    pid=$(main_pid)
    ct kill "-$sig" "$pid" || return 1
    wait_for "$limit" restarted_since "$pid" || { echo "not restarted: $(unit ActiveState), MainPID $(main_pid)"; return 1; }
    echo $((SECONDS - t0))
}

t_restart_on_kill() {
    ct systemctl start chatd || return 1
    local took
    took=$(signal_and_wait_restart KILL 30) || { echo "$took"; return 1; }
    echo "restarted in $took s (NRestarts=$(unit NRestarts))"
    client_join gina || return 1
    close_all_clients
}

# The short-watchdog drop-in goes away again whatever happens.
t_watchdog() {
    watchdog
    local rc=$?
    close_all_clients
    ct rm -f /run/systemd/system/chatd.service.d/test-watchdog.conf
    ct systemctl daemon-reload
    ct -t 60 systemctl stop chatd
    return $rc
}

watchdog() {
    # A short watchdog so the test is quick; the shipped unit has WatchdogSec=10s.
    ct mkdir -p /run/systemd/system/chatd.service.d || return 1
    ct sh -c 'printf "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=5s\n" > /run/systemd/system/chatd.service.d/test-watchdog.conf' || return 1
    ct systemctl daemon-reload || return 1
    ct systemctl restart chatd || return 1
    local took
    took=$(signal_and_wait_restart STOP 60) || { echo "$took"; return 1; }
    echo "frozen chatd replaced in $took s"
    ct journalctl -u chatd --no-pager -o cat | grep -i 'watchdog timeout' | tail -n 1 | grep . ||
        { echo "no watchdog timeout in the journal"; return 1; }
    client_join hank
}

# The cluster case (docs/cluster.md): Debian's nats-server with JetStream and two chatd nodes
# serving one room, node a the packaged chatd.service and node b a second unit made here from
# it, both ordered after nats-server.service by the drop-in the package ships as an example.
# Everything it adds goes away again whatever happens, so the purge check sees a plain package.
PORT_B=42079
EXAMPLES=/usr/share/doc/chatd/examples

t_cluster() {
    ct cp "$CONF" /root/chatd.toml.single || return 1
    cluster
    local rc=$?
    close_all_clients
    ct -t 60 systemctl stop chatd.service chatd-b.service nats-server.service
    ct rm -rf /etc/systemd/system/chatd.service.d /etc/systemd/system/chatd-b.service.d \
        /etc/systemd/system/nats-server.service.d /run/systemd/system/chatd-b.service \
        /etc/chatd/chatd-b.toml
    ct cp /root/chatd.toml.single "$CONF"
    ct systemctl daemon-reload
    return $rc
}

cluster() {
    local s
    s=$(ct systemctl is-active nats-server.service)
    [ "$s" = inactive ] || { echo "nats-server is $s before the cluster case, want inactive"; return 1; }
    # The admin's steps from docs/cluster.md: the two shipped drop-ins, and the [cluster] table
    # of the shipped config uncommented, each node with its own name.
    local d
    for d in chatd chatd-b; do
        ct install -D -m 644 "$EXAMPLES/chatd-cluster.conf" "/etc/systemd/system/$d.service.d/cluster.conf" || return 1
    done
    ct install -D -m 644 "$EXAMPLES/nats-server-jetstream.conf" \
        /etc/systemd/system/nats-server.service.d/jetstream.conf || return 1
    ct sed -i -e 's/^#\[cluster\]$/[cluster]/' -e 's/^#\([a-z-]* = \)/\1/' \
        -e 's/^node = ""/node = "a"/' -e 's/^name = "main"/name = "systemd-test"/' "$CONF" || return 1
    ct sh -c "sed -e 's/42069/$PORT_B/g' -e 's/^node = \"a\"/node = \"b\"/' $CONF >/etc/chatd/chatd-b.toml" || return 1
    ct chatd --check-config --config /etc/chatd/chatd-b.toml >"$WORK/cluster-config.out" 2>&1 ||
        { cat "$WORK/cluster-config.out"; return 1; }
    grep -qx 'node = "b"' "$WORK/cluster-config.out" || { echo "node b's config:"; cat "$WORK/cluster-config.out"; return 1; }
    # Node b: the packaged unit with its own config, runtime and state directories.
    ct sh -c 'sed -e "s|^ExecStart=/usr/sbin/chatd$|& --config /etc/chatd/chatd-b.toml|" \
        -e "s/^RuntimeDirectory=chatd$/RuntimeDirectory=chatd-b/" -e "s/^StateDirectory=chatd$/StateDirectory=chatd-b/" \
        /usr/lib/systemd/system/chatd.service >/run/systemd/system/chatd-b.service' || return 1
    ct systemctl daemon-reload || return 1
    local u after wants
    for u in chatd chatd-b; do
        after=$(ct systemctl show -P After "$u.service")
        wants=$(ct systemctl show -P Wants "$u.service")
        [[ $after == *nats-server.service* && $wants == *nats-server.service* ]] ||
            { echo "$u: After=$after Wants=$wants, want nats-server.service in both"; return 1; }
        [ "$(ct systemctl show -P TimeoutStartUSec "$u.service")" = 5min ] || { echo "$u: TimeoutStartSec is not 5min"; return 1; }
    done
    [ "$(ct systemctl show -P ExecStart chatd-b.service | grep -c chatd-b.toml)" = 1 ] ||
        { echo "chatd-b.service does not run with chatd-b.toml"; return 1; }
    # Wants= starts NATS with the nodes, After= orders them behind it, and each start returns
    # only on the node's READY=1, which it sends once it follows the room.
    local t0=$SECONDS
    ct -t 120 systemctl start chatd.service chatd-b.service ||
        { ct journalctl -u nats-server -u chatd -u chatd-b -n 30 --no-pager; return 1; }
    echo "systemctl start chatd chatd-b (nats-server pulled in) returned after $((SECONDS - t0)) s"
    for u in nats-server chatd chatd-b; do
        s=$(ct systemctl is-active "$u.service")
        [ "$s" = active ] || { echo "$u.service is $s after the start"; return 1; }
    done
    # After=: each node's process started once nats-server was up, not beside it.
    local nats_up started
    nats_up=$(ct systemctl show -P ActiveEnterTimestampMonotonic nats-server.service)
    for u in chatd chatd-b; do
        started=$(ct systemctl show -P ExecMainStartTimestampMonotonic "$u.service")
        [ "${started:-0}" -ge "${nats_up:-1}" ] && [ "${nats_up:-0}" -gt 0 ] ||
            { echo "$u started at $started, nats-server became active at $nats_up (monotonic µs)"; return 1; }
    done
    local status
    for s in /run/chatd/chatd.sock /run/chatd-b/chatd.sock; do
        status=$(ct chatctl --socket "$s" status) || { echo "chatctl status on $s failed: $status"; return 1; }
        [[ $status == *"following the room"* ]] ||
            { echo "ready, but not following the room ($s):"; echo "$status"; return 1; }
    done
    grep 'cluster node' <<<"$status"
    # A user on each node; each sees the other's join and line.
    client_join ivy "$PORT" || return 1
    client_join jack "$PORT_B" || return 1
    client_wait ivy "*** JOIN jack" || return 1
    client_send ivy "hello from node a"
    client_wait jack "ivy: hello from node a" || return 1
    client_send jack "hello from node b"
    client_wait ivy "jack: hello from node b" || return 1
    # Each node lists both users with the node each is on.
    local list
    for s in /run/chatd/chatd.sock /run/chatd-b/chatd.sock; do
        list=$(ct chatctl --socket "$s" list) || { echo "chatctl list on $s failed: $list"; return 1; }
        awk '$1 == "ivy" && $2 == "a" {i = 1} $1 == "jack" && $2 == "b" {j = 1} END {exit !(i && j)}' <<<"$list" ||
            { echo "chatctl list on $s lacks ivy on a and jack on b:"; echo "$list"; return 1; }
    done
    echo "$list"
}

# ---------------------------------------------------------------------------------------------

run_release() {
    REL=$1
    local t0=$SECONDS dir fails_before=$FAILS
    log "=== $REL"
    CURRENT="rootfs ($ROOTFS_DIR/chatd-rootfs-$REL)"
    if dir=$(rootfs "$REL"); then pass; else fail "debootstrap failed"; fi
    CURRENT="boot systemd in nspawn"
    if [ -n "$dir" ]; then
        check "boot systemd in nspawn" boot "$dir"
    else
        fail "no rootfs"
    fi
    SYSTEMD_VERSION=$(ct systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
    SYSTEMD_VERSION=${SYSTEMD_VERSION:-0}

    check "dpkg -i installs binaries, units, man pages, completions, conffile, group chatadm" t_install
    check "installation enables and starts nothing" t_nothing_enabled
    check "reload path for systemd $SYSTEMD_VERSION" t_reload_path
    check "systemd-analyze security chatd.service <= 2.0 (as installed)" t_security
    check "systemctl start chatd returns once chatd is ready" t_start
    check "chat-client and plain TCP clients chat through chatd" t_chat
    check "chatctl list/announce/kick as a member of chatadm" t_chatctl_admin
    check "chatctl refused for a user outside chatadm" t_chatctl_refused
    check "edit chatd.toml + systemctl reload applies it, nobody disconnected" t_reload
    check "broken edit + reload: still active, error in journalctl -u chatd" t_broken_reload
    check "journal records carry CHAT_USER" t_journal_fields
    check "upgrade keeps the edited conffile and restarts a running chatd" t_upgrade
    check "systemctl stop tells users and stops cleanly" t_stop
    check "socket activation via chatd.socket" t_socket_activation
    check "killed chatd is restarted by systemd" t_restart_on_kill
    check "SIGSTOPped chatd is killed and restarted by the watchdog" t_watchdog
    check "cluster: Debian's nats-server + two chatd units after it, one room" t_cluster
    check "dpkg --purge stops chatd and removes it" t_purge

    if [ "$FAILS" -gt "$fails_before" ]; then
        ct journalctl -u chatd --no-pager -n 60 >"$WORK/journal-$REL.log" 2>&1
        log "last journal lines of chatd ($REL):"
        tail -n 30 "$WORK/journal-$REL.log"
    fi
    close_all_clients
    stop_container
    log "=== $REL done in $((SECONDS - t0)) s"
}

if [ "$DEB" = --prepare ]; then
    # Downloading is network-bound: CI runs this in the background while it compiles.
    pids=()
    for rel in $RELEASES; do
        rootfs "$rel" >/dev/null &
        pids+=($!)
    done
    rc=0
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    log "rootfs ready: $RELEASES (status $rc)"
    exit $rc
fi

for rel in $RELEASES; do
    run_release "$rel"
done
echo "test-systemd: $PASSES passed, $FAILS failed"
[ "$FAILS" -eq 0 ]
