#!/usr/bin/env bash
# Installs what portfwd's lab and tests need on a fresh Debian machine (run as root).
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v iptables-save >/dev/null 2>&1 || need+=(iptables)
command -v iptables-legacy-save >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v sysctl >/dev/null 2>&1 || need+=(procps)

if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: warning: not root; the lab and end-to-end tests need root (network namespaces)" >&2
fi
