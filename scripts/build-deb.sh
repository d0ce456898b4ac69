#!/usr/bin/env bash
# Builds the Debian package: the static binary (scripts/build-release.sh), the man pages,
# completions and schema rendered from the clap definitions (portfwd-assets), then
# `cargo deb --no-build`. Needs cargo-deb (scripts/setup.sh --all installs it). Prints the
# .deb's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-release.sh >/dev/null
cargo build --release --quiet -p portfwd-module --bin portfwd-assets
rm -rf target/assets
target/release/portfwd-assets target/assets
gzip -9nf target/assets/*.1 target/assets/*.5
cargo deb --quiet -p portfwd-module --no-build --no-strip --target x86_64-unknown-linux-musl \
  --output target/debian/ >/dev/null
deb=$(ls -t target/debian/portfwd_*.deb | head -1)
echo "build-deb: $deb $(stat -c %s "$deb") bytes" >&2
echo "$deb"
