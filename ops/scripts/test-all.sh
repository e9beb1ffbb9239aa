#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine (as root), then runs it all.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
command -v cc >/dev/null || need_apt+=(build-essential)
dpkg -s softhsm2 >/dev/null 2>&1 || need_apt+=(softhsm2)
dpkg -s prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v etcd >/dev/null || need_apt+=(etcd-server)
# ops/deploy: systemd-analyze verify of the units.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# chaos-tests: a node whose clock runs ahead (libfaketime).
dpkg -s faketime >/dev/null 2>&1 || need_apt+=(faketime)
if [ "$(id -u)" = 0 ]; then
  # chaos-tests: a network namespace per node, partitions with iptables (root only).
  command -v ip >/dev/null || need_apt+=(iproute2)
  command -v iptables >/dev/null || need_apt+=(iptables)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing Debian packages: ${need_apt[*]} (run as root to install them)" >&2
    exit 1
  fi
fi
python3 -c 'import spiffe' 2>/dev/null || python3 -m pip install -q 'spiffe==0.3.2'
python3 -c 'import moto.server' 2>/dev/null || python3 -m pip install -q 'moto[server]==5.2.1'

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== tests"
cargo test --workspace --locked

echo "== fuzz targets: committed corpus, then 20 s of random inputs each (one second each ran above)"
BOLERO_RANDOM_TEST_TIME_MS=20000 cargo test --workspace --locked --lib fuzz
