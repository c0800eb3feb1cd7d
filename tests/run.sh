#!/usr/bin/env bash
# Install what the tests need, then run them: bash tests/run.sh [pytest args...]
# (bash tests/run.sh tests/test_connect.py runs one file; -k NAME, -x as pytest takes them)
# - Debian packages used as real clients and peers: curl, openssl, tinyproxy, squid, apache2-utils,
#   chromium (a headless browser driving apps behind the inbound gateway: tests/browser.py),
#   prometheus (promtool checks and unit-tests the alert rules; a real Prometheus scrapes proxygate),
#   haproxy (a load balancer sending the PROXY protocol), logrotate (etc/logrotate.d),
#   iproute2 (network namespaces for the `self` destination tests), nghttp2-server (nghttpd: an
#   HTTP/2 origin in C for the h2 codec's interop tests)
# - a virtualenv (.venv, or $PROXYGATE_VENV) with proxygate and its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in curl:curl openssl:openssl tinyproxy:tinyproxy squid:squid htpasswd:apache2-utils \
    chromium:chromium promtool:prometheus haproxy:haproxy logrotate:logrotate \
    ip:iproute2 nghttpd:nghttp2-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing ${need[*]}: install them (apt-get install ${need[*]})" >&2
    exit 1
  fi
  # Installing squid/tinyproxy/prometheus/haproxy must not start their system services (:3128,
  # :8888, :9090...).
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" python3-venv >/dev/null
  [ -n "$guard" ] && rm -f "$guard"
fi

venv=${PROXYGATE_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q '.[test]'
# One pytest worker per CPU (pytest-xdist): most of the suite waits on sockets and timers.
# Workers take tests in file order and steal from each other when done. -n 0 runs the tests
# in this one process (for -s, --pdb); a later -n in the arguments wins.
exec "$venv/bin/python" -m pytest -n auto --dist worksteal "$@"
