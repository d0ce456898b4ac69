#!/usr/bin/env bash
# The main job: build portfwd and run the lab demo (a forward applied inside network
# namespaces with the real binary, proven with real traffic).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet -p portfwd-module -p portfwd-harness
exec target/release/portfwd-lab demo
