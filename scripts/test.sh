#!/usr/bin/env bash
# Sets up and runs every test: formatting, lints, unit tests, CLI tests, the end-to-end tests
# in network namespaces (root) including real ansible-playbook (local and over SSH) and Salt
# runs, every lab scenario, the demo, and the end-to-end suite and the lab in VMs of Debian 11
# and 12. Under CI=true a missing prerequisite fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --all
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
# Ansible ships the release binary (static musl when that target is installed).
PORTFWD_MODULE_BIN=$(pwd)/$(bash scripts/build-release.sh)
export PORTFWD_MODULE_BIN
cargo test --workspace
# Kernels before 5.14 have no SO_NETNS_COOKIE: the routing suite again with the fallback key.
PORTFWD_NO_NETNS_COOKIE=1 cargo test -p portfwd-e2e --test e2e -- routing:: records::
target/debug/portfwd-lab run --junit target/lab-junit.xml
# Every scenario once more with the native nftables backend (where a scenario does not pin one).
target/debug/portfwd-lab run --backend nftables --junit target/lab-junit-nftables.xml
target/debug/portfwd-lab demo
# Real older kernels and tools, in QEMU VMs (scripts/vm.sh): on Debian 11 (Linux 5.10, nft
# 0.9.8, iptables 1.8.7) the whole e2e suite but the Ansible, Salt and packaging tests, and
# every lab scenario with both backends; on Debian 12 (Linux 6.1), to fit the CI budget, the
# suites whose subject is the kernel's nf_tables and conntrack and the lab with both backends.
bash scripts/vm.sh bullseye
bash scripts/vm.sh --test forward:: --test nftables:: --test conntrack:: --test trace:: bookworm
