#!/usr/bin/env bash
# Builds the release portfwd binary, always static (x86_64-unknown-linux-musl): the binary
# Ansible copies to every target must run on old userlands (RHEL 8's glibc 2.28, Debian 11's
# 2.31). Fails loudly when the musl target or musl-gcc (for mimalloc) is missing: run
# scripts/setup.sh. Prints the binary's path on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "build-release: the Rust target $target is not installed (scripts/setup.sh installs it: rustup target add $target)" >&2
  exit 1
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
  echo "build-release: musl-gcc not found (scripts/setup.sh installs musl-tools)" >&2
  exit 1
fi
cargo build --release --quiet --target "$target" -p portfwd-module --bin portfwd
bin="target/$target/release/portfwd"
echo "build-release: $bin $(stat -c %s "$bin") bytes" >&2
echo "$bin"
