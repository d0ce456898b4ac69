#!/usr/bin/env bash
# The fleet benchmark: FLEET_HOSTS (default 20) namespaces running sshd, 100 forwards each,
# one ansible-playbook with forks over SSH; one portfwd task against the same forwards as 200
# ansible.builtin.iptables tasks, converge and re-run, in the same run. Prints the times and
# the ratios. Needs root and scripts/setup.sh --all (ansible-core, sshd).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-release.sh >/dev/null
cargo test --quiet -p portfwd-e2e --test e2e -- --ignored --exact fleet::fleet_benchmark --nocapture 2>&1 |
  grep -v '^running\|^test \|^$\|test result'
