#!/usr/bin/env bash
# Builds the Ansible collection tarball portfwd-portfwd-<version>.tar.gz.
# usage: build-collection.sh BINARY OUTDIR [ANSIBLE_GALAXY]
# BINARY is the portfwd module binary to ship (preferably the static musl build).
set -euo pipefail
bin=${1:?binary}; out=${2:?outdir}; galaxy=${3:-ansible-galaxy}
root=$(cd "$(dirname "$0")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/plugins/modules" "$stage/meta" "$out"
cp "$root/collection/galaxy.yml" "$root/collection/README.md" "$stage/"
cp "$root/collection/meta/runtime.yml" "$stage/meta/"
install -m 0755 "$bin" "$stage/plugins/modules/portfwd"
cp "$root/playbooks/library/portfwd.yml" "$stage/plugins/modules/portfwd.yml"
"$galaxy" collection build --force --output-path "$out" "$stage" >&2
ls "$out"/portfwd-portfwd-*.tar.gz
