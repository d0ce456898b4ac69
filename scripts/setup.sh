#!/usr/bin/env bash
# Installs what portfwd's lab and tests need on a fresh Debian machine (run as root).
# Idempotent: installs only what is missing.
#   - iptables (both flavours, with nft), iproute2, conntrack, tcpdump, procps
#   - with --all (the tests): sshd, and ansible-core and salt from PyPI, each in its own
#     virtualenv under ${PORTFWD_CACHE:-$HOME/.cache/portfwd}
#     (PORTFWD_ANSIBLE_VENV / PORTFWD_SALT_VENV override)
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have iptables-save || need+=(iptables)
have iptables-legacy-save || need+=(iptables)
have nft || need+=(nftables)
have ip || need+=(iproute2)
have conntrack || need+=(conntrack)
have tcpdump || need+=(tcpdump)
have sysctl || need+=(procps)
all=false
[ "${1:-}" = "--all" ] && all=true
if $all; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  have ssh-keygen || need+=(openssh-client)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
  have strace || need+=(strace)
fi

if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: warning: not root; the lab and end-to-end tests need root (network namespaces)" >&2
fi
cache=${PORTFWD_CACHE:-$HOME/.cache/portfwd}
if ! $all; then
  exit 0
fi
venv() {  # venv DIR CHECK PACKAGE...
  local dir=$1 check=$2; shift 2
  if [ ! -x "$dir/bin/$check" ]; then
    echo "setup: creating $dir with $*"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@"
  fi
}
venv "${PORTFWD_ANSIBLE_VENV:-$cache/ansible-venv}" ansible-playbook 'ansible-core>=2.19,<2.20'
venv "${PORTFWD_SALT_VENV:-$cache/salt-venv}" salt-call 'salt>=3007'

