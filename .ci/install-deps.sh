#!/usr/bin/env bash
# System packages the test suite drives for real: tmux (chat-client in a pseudo-terminal),
# prlimit and setpriv from util-linux (lowering chatd's hard fd limit; chatctl as another user),
# iproute2 (ss reads keepalive timers; ip and nftables make a half-open peer in its own network
# namespace), nats-server (the cluster tests start real NATS servers), openssl (s_client talks
# to the TLS listener in tests/tls.rs), haproxy (a real balancer sending the PROXY protocol),
# prometheus (promtool checks /metrics and the alert rules), chromium and chromium-driver
# (tests/browser.rs drives the web page in headless Chromium through chromedriver). Installed
# only when missing, so a prepared machine pays nothing. Without them the tests that need them
# skip, except under CI=true (.ci/run), where they fail.
set -euo pipefail
need=()
command -v tmux >/dev/null || need+=(tmux)
command -v prlimit >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v ss >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v openssl >/dev/null || need+=(openssl)
# nats-server lives in /usr/sbin, which a non-root PATH may lack.
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
