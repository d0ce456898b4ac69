#!/usr/bin/env bash
# Runs both benchmarks (root): the control plane (portfwd at scale against bare reads, a bare
# iptables-restore and the per-rule approach) and the data plane (throughput and latency
# through portfwd's kernel NAT against the routed path, socat, haproxy and rinetd), then a
# 16-backend pool against one `to`.
# Prints the tables; writes target/bench-control.json, target/bench-data.json,
# target/bench-pool.json and
# target/bench-scaling.svg. Everything runs inside network namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
need=()
for tool in iperf3 socat haproxy rinetd; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
[ -x /usr/bin/time ] || need+=(time)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  # The packages start their own services on the host; the benchmark runs its own copies.
  for service in haproxy rinetd; do
    systemctl stop "$service" 2>/dev/null || pkill -x "$service" || true
  done
fi
cargo build --release --quiet -p portfwd-module -p portfwd-harness
target/release/portfwd-bench control "$@"
target/release/portfwd-bench data
target/release/portfwd-bench pool
