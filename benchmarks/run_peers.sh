#!/usr/bin/env bash
# Run the shared peer-proxy harness (../shared/bench/run.sh) with proxygate added as a row.
#
#   benchmarks/run_peers.sh                                  # default matrix below
#   benchmarks/run_peers.sh --scenarios get1k,dk_http --rounds 2
#   benchmarks/run_peers.sh --install                        # first time: apt + /tmp/benchvenv
#   PROXYGATE_VENV=/path/venv benchmarks/run_peers.sh ...
#
# Any argument is passed on to run.py (see `../shared/bench/run.sh --help`); when no
# --proxies / --scenarios / --rounds / --duration / --warmup is given, the defaults below are used.
# The harness starts proxygate itself, pinned to CPU0, once per cell, on 127.0.0.1:{port}.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
HARNESS=${BENCH_HARNESS:-$REPO/../shared/bench/run.sh}
PG_VENV=${PROXYGATE_VENV:-/work/venv}
CONFIG="$HERE/bench.ini"            # absolute: the harness may start the proxy in another cwd

[[ -x "$PG_VENV/bin/twistd" ]] || { echo "no twistd in $PG_VENV (set PROXYGATE_VENV)" >&2; exit 1; }
[[ -f "$HARNESS" ]] || { echo "harness not found: $HARNESS (set BENCH_HARNESS)" >&2; exit 1; }
# PYTHONPATH=$REPO: benchmark this working tree (gateway/ and twisted/plugins/proxygate.py)
# from any cwd. A copy pip-installed into the venv puts its own twisted/plugins/proxygate.py
# first, and twistd would run that plugin with this tree's gateway/: refuse the mix.
plugin=$(PYTHONPATH="$REPO" "$PG_VENV/bin/python" -c '
import sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
print(*[sys.modules[type(p).__module__].__file__ for p in getPlugins(IServiceMaker) if p.tapname == "proxygate"])') \
  && [[ -n "$plugin" ]] || { echo "the proxygate twistd plugin does not load from $REPO" >&2; exit 1; }
if [[ "$plugin" != "$REPO/twisted/plugins/proxygate.py" ]] && ! cmp -s "$plugin" "$REPO/twisted/plugins/proxygate.py"; then
  echo "$PG_VENV runs the twistd plugin $plugin, not this tree's: reinstall (pip install $REPO)" >&2
  exit 1
fi

PG_CMD="env PYTHONPATH=$REPO $PG_VENV/bin/twistd -n --pidfile= proxygate --config $CONFIG"
PG_CMD+=" --listen tcp:{port}:interface=127.0.0.1 --metrics-listen ''"

# The TLS-intercepting row: the same proxy with [mitm] on, trusting the harness's origin CA
# upstream; the load generator trusts proxygate's CA (created here once, before the run).
CA_DIR=${PROXYGATE_BENCH_CA:-/tmp/proxygate-bench-ca}
mkdir -p "$CA_DIR"
PYTHONPATH="$REPO" "$PG_VENV/bin/python" -c \
  "from gateway.tls.ca import loadOrCreateCA; loadOrCreateCA('$CA_DIR/ca.pem', '$CA_DIR/ca.key')"
PG_MITM_CMD="$PG_CMD --set mitm.enabled=on --set mitm.ca_cert=$CA_DIR/ca.pem"
PG_MITM_CMD+=" --set mitm.ca_key=$CA_DIR/ca.key --set mitm.upstream_ca_bundle={origin_ca}"

defaults=()
have() { local f; for f in "${ARGS[@]}"; do [[ "$f" == "$1" || "$f" == "$1="* ]] && return 0; done; return 1; }
if [[ "${1:-}" == "--install" ]]; then    # apt + venv only; --list keeps it from starting a run
  shift; bash "$HARNESS" --install --list; [[ $# -eq 0 ]] && exit 0
fi
ARGS=("$@")
have --proxies   || defaults+=(--proxies direct,squid,tinyproxy,twisted,proxy.py,proxygate)
have --scenarios || defaults+=(--scenarios get1k,get1k_new,get1m,tls1k,dk_https,dk_http)
have --rounds    || defaults+=(--rounds 1)
have --duration  || defaults+=(--duration 3)
have --warmup    || defaults+=(--warmup 0.5)
have --list && defaults=()

# The harness hard-codes its nginx origin on 127.0.0.1:18080/18443. When another job holds
# those ports (or BENCH_ORIGIN_PORTS="HTTP HTTPS" is set), run an unmodified copy of the
# harness whose only change is those two port numbers.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n "${BENCH_ORIGIN_PORTS:-}" ]] || port_busy 18080 || port_busy 18443; then
  read -r OH OS <<<"${BENCH_ORIGIN_PORTS:-28080 28443}"
  COPY=$(mktemp -d /tmp/peerbench.XXXXXX)
  trap 'rm -rf "$COPY"' EXIT
  cp -r "$(dirname "$HARNESS")"/. "$COPY"/
  sed -i -e "s/^ORIGIN_HTTP = 18080$/ORIGIN_HTTP = $OH/" -e "s/^ORIGIN_HTTPS = 18443$/ORIGIN_HTTPS = $OS/" \
    "$COPY/run.py"
  grep -q "^ORIGIN_HTTP = $OH$" "$COPY/run.py" && grep -q "^ORIGIN_HTTPS = $OS$" "$COPY/run.py" \
    || { echo "could not move the origin ports in $COPY/run.py" >&2; exit 1; }
  echo "[run_peers] origin ports 18080/18443 busy or overridden: using $OH/$OS ($COPY)" >&2
  HARNESS="$COPY/run.sh"
fi

# proxygate-w2: two worker processes on the same listening socket ([proxy] workers = 2). The
# harness pins every proxy to CPU0, so compare it with --no-pin (issue 8's "all cores" goal).
bash "$HARNESS" --proxy "proxygate=$PG_CMD" --proxy "proxygate-mitm=$PG_MITM_CMD" \
  --proxy "proxygate-w2=$PG_CMD --set proxy.workers=2" \
  --mitm-ca "proxygate-mitm=$CA_DIR/ca.pem" "${defaults[@]}" "$@"
