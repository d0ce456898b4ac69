#!/usr/bin/env bash
# Sets up and runs every test: formatting, lints, unit tests, CLI tests, the end-to-end tests
# in network namespaces (root) including real ansible-playbook (local and over SSH) and Salt
# runs, every lab scenario, and the demo. Under CI=true a missing prerequisite fails the run
# instead of skipping.
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
