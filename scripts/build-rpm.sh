#!/usr/bin/env bash
# Builds the RPM (RHEL, Rocky, Fedora): the static binary (scripts/build-release.sh), the man
# pages, completions and schema rendered by portfwd-assets, then cargo-generate-rpm. Needs
# cargo-generate-rpm (scripts/setup.sh --all installs it). Prints the .rpm's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-release.sh >/dev/null
cargo build --release --quiet -p portfwd-module --bin portfwd-assets
rm -rf target/assets
target/release/portfwd-assets target/assets
gzip -9nf target/assets/*.1 target/assets/*.5
rm -rf target/generate-rpm && mkdir -p target/generate-rpm
cargo generate-rpm -p module --target x86_64-unknown-linux-musl -o target/generate-rpm/ >&2
rpm=$(ls -t target/generate-rpm/portfwd-*.rpm | head -1)
echo "build-rpm: $rpm $(stat -c %s "$rpm") bytes" >&2
echo "$rpm"
