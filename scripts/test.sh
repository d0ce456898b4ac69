#!/usr/bin/env bash
# Sets up and runs every test: formatting, lints, unit tests, CLI tests and the end-to-end
# tests in network namespaces (root). Under CI=true a missing prerequisite fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --quiet
cargo test --workspace
target/debug/portfwd-lab demo
