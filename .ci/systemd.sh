#!/usr/bin/env bash
# CI step for issue 4 (run by .ci/run after cargo test, as root): builds the Debian package the
# way docs/packaging.md describes, checks the unit's hardening score, and proves the package
# under a real systemd on Debian 12 and 13 (packaging/test-systemd.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# Cargo's output directory: target/ unless CARGO_TARGET_DIR says otherwise (cargo deb follows it).
T=${CARGO_TARGET_DIR:-target}

step() { printf '== %s (%s, %d s into this step)\n' "$1" "$(date -u +%H:%M:%S)" "$SECONDS"; }

step "tools: systemd-nspawn, debootstrap, dpkg-shlibdeps, cargo-deb"
missing=()
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian 12 and 13 rootfs (cached in /var/tmp between runs on one machine) download while
# the build below keeps the CPUs busy; the test makes any that is still missing itself.
mkdir -p target
bash packaging/test-systemd.sh --prepare >target/rootfs-prepare.log 2>&1 &
prepare=$!

# cargo-deb 3 is what the [package.metadata.deb] section is written for.
version=$(cargo deb --version 2>/dev/null || true)
if [[ $version != *" 3."* ]]; then
    cargo install cargo-deb --locked --version '^3.8' --quiet
fi

step "cargo build --release"
cargo build --release --locked

step "man pages and completions from the clap definitions"
rm -rf packaging/generated
"$T"/release/chatd-gen-assets packaging/generated >/dev/null

step "cargo deb"
rm -rf "$T"/debian
cargo deb -p chatd --no-build --locked
deb=$(ls "$T"/debian/chatd_*.deb)
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb" | awk '{print $6}'

step "systemd-analyze security (exposure must be 2.0 or lower)"
if ! score=$(systemd-analyze security --offline=true --threshold=20 packaging/chatd.service 2>&1); then
    echo "$score"
    exit 1
fi
echo "$score" | tail -n 1

step "the package under a real systemd"
wait "$prepare" || { echo "preparing the rootfs failed:"; tail -n 20 target/rootfs-prepare.log; }
bash packaging/test-systemd.sh "$deb"
step "done"
