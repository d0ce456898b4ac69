#!/usr/bin/env bash
# Builds the release portfwd binary: static (x86_64-unknown-linux-musl) when that Rust target
# is installed, else the glibc build. Prints the binary's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
if rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  cargo build --release --quiet --target "$target" -p portfwd-module
  bin="target/$target/release/portfwd"
else
  echo "build-release: $target not installed, building for glibc" >&2
  cargo build --release --quiet -p portfwd-module
  bin="target/release/portfwd"
fi
echo "build-release: $bin $(stat -c %s "$bin") bytes" >&2
echo "$bin"
