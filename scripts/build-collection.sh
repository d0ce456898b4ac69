#!/usr/bin/env bash
# Builds the Ansible collection tarball portfwd-portfwd-<version>.tar.gz.
# usage: build-collection.sh BINARY OUTDIR [ANSIBLE_GALAXY] [STAGE]
# BINARY is the portfwd module binary to ship (the static musl build of build-release.sh).
# STAGE, when given, keeps the collection tree there (ansible-test sanity runs in it; it must
# end in ansible_collections/portfwd/portfwd).
set -euo pipefail
bin=${1:?binary}; out=${2:?outdir}; galaxy=${3:-ansible-galaxy}; stage=${4:-}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$stage" ]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
fi
mkdir -p "$stage/plugins/modules" "$out"
cp -r "$root/collection/." "$stage/"
install -m 0755 "$bin" "$stage/plugins/modules/portfwd"
cp "$root/playbooks/library/portfwd.yml" "$stage/plugins/modules/portfwd.yml"
"$galaxy" collection build --force --output-path "$out" "$stage" >&2
ls "$out"/portfwd-portfwd-*.tar.gz
