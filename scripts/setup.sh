#!/usr/bin/env bash
# Installs what portfwd's lab and tests need on a fresh Debian machine (run as root).
# Idempotent: installs only what is missing.
#   - iptables (both flavours, with nft), iproute2, conntrack, tcpdump, procps
#   - the Rust target x86_64-unknown-linux-musl and musl-tools: the shipped binary is static
#   - with --all (the tests): sshd, strace, man-db, cargo-deb, rpm and cargo-generate-rpm, a
#     Debian 11 root made with debootstrap, and ansible-core (with antsibull-changelog) and
#     salt from PyPI in virtualenvs, all cached under
#     ${PORTFWD_CACHE:-$HOME/.cache/portfwd} (PORTFWD_ANSIBLE_VENV / PORTFWD_SALT_VENV /
#     PORTFWD_DEBIAN11_ROOT override); QEMU (qemu-system-x86) and debootstrap for the VM suites
#     of scripts/vm.sh, which builds its own images
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
have musl-gcc || need+=(musl-tools)
all=false
[ "${1:-}" = "--all" ] && all=true
if $all; then
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  have ssh-keygen || need+=(openssh-client)
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
  have strace || need+=(strace)
  have man || need+=(man-db)
  have debootstrap || need+=(debootstrap)
  have qemu-system-x86_64 || need+=(qemu-system-x86)
  have mke2fs || need+=(e2fsprogs)
  have systemd-analyze || need+=(systemd)
  have rpm || need+=(rpm)
fi

if [ "${#need[@]}" -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A toolchain component, like clippy: the release build refuses to ship a glibc binary.
if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl ||
    rustup target add x86_64-unknown-linux-musl
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
# The collection's changelog is antsibull-changelog's (the tests lint it and regenerate it).
[ -x "${PORTFWD_ANSIBLE_VENV:-$cache/ansible-venv}/bin/antsibull-changelog" ] ||
  "${PORTFWD_ANSIBLE_VENV:-$cache/ansible-venv}/bin/pip" install -q --disable-pip-version-check 'antsibull-changelog>=0.29'
# ansible-test sanity puts pip into each test's virtualenv with a get-pip.py it downloads from
# ci-files.testing.ansible.com, which this machine cannot reach: an equivalent built on
# ensurepip + the package index goes into its cache, under the pip version it asks for.
ansible_venv=${PORTFWD_ANSIBLE_VENV:-$cache/ansible-venv}
pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',.*/\1/p" \
  "$ansible_venv"/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py | head -1)
if [ -n "$pip_version" ]; then
  mkdir -p "$HOME/.ansible/test/cache"
  cp "$(dirname "$0")/get-pip-offline.py" "$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
fi
command -v cargo-deb >/dev/null 2>&1 || cargo install --locked --quiet cargo-deb
command -v cargo-generate-rpm >/dev/null 2>&1 || cargo install --locked --quiet cargo-generate-rpm
# An older userland for the static binary to prove itself on: Debian 11 (glibc 2.31).
root=${PORTFWD_DEBIAN11_ROOT:-$cache/debian11-root}
if [ ! -e "$root/.portfwd-root-v1" ]; then
  echo "setup: making a Debian 11 root in $root (debootstrap)"
  rm -rf "$root.tmp" "$root"
  debootstrap --variant=minbase --include=iptables,iproute2,procps bullseye "$root.tmp" \
    http://deb.debian.org/debian >/dev/null
  mkdir -p "$root.tmp/usr/local/sbin"
  : > "$root.tmp/usr/local/sbin/portfwd"   # mount point for the binary under test
  touch "$root.tmp/.portfwd-root-v1"
  mv "$root.tmp" "$root"
fi
