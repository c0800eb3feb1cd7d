#!/usr/bin/env bash
# Install what the tests need, then run them: bash tests/run.sh [pytest args...]
# - Debian packages used as real clients and peers: curl, openssl, tinyproxy, squid, apache2-utils,
#   iproute2 (network namespaces for the `self` destination tests)
# - a virtualenv (.venv, or $PROXYGATE_VENV) with proxygate and its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in curl:curl openssl:openssl tinyproxy:tinyproxy squid:squid htpasswd:apache2-utils ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: missing ${need[*]}: install them (apt-get install ${need[*]})" >&2
    exit 1
  fi
  # Installing squid/tinyproxy must not start their system services on :3128/:8888.
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
exec "$venv/bin/python" -m pytest "$@"
