#!/usr/bin/env bash
# Runs the end-to-end suite and the lab scenarios (both backends) inside QEMU VMs that boot a
# Debian release's own kernel and userland, so older kernels and tools are tested for real.
#
#   scripts/vm.sh [--test FILTER]... [--skip FILTER]... [--no-lab] SUITE...
#   scripts/vm.sh --exec 'COMMANDS' SUITE     (a shell script in the guest instead of the tests)
#
# SUITE is bullseye (Debian 11: Linux 5.10, nft 0.9.8, iptables 1.8.7) or bookworm (Debian 12:
# Linux 6.1, nft 1.0.6, iptables 1.8.9). FILTER is a libtest name filter (`routing::`); --test
# runs only matching tests, --skip leaves matching tests out. The Ansible (fleet included), Salt
# and packaging tests need virtualenvs and host tools and are not run in the VMs.
#
# The image per suite (debootstrap: kernel, initrd, iptables, nftables, iproute2, conntrack,
# procps, python3, tcpdump, socat) is cached under ${PORTFWD_CACHE:-$HOME/.cache/portfwd}/vm.
# The static binaries (portfwd, portfwd-lab, the e2e test binary; x86_64-unknown-linux-musl)
# reach the guest through a read-only 9p share of the source tree at the same path; the guest
# writes its output, JUnit files and console log to target/vm/SUITE/. KVM is used when a short
# probe boots with it, else TCG (software emulation); the run says which.
# Exit status 0 when every test and scenario passed in every suite.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${PORTFWD_CACHE:-$HOME/.cache/portfwd}/vm
packages=linux-image-amd64,kmod,util-linux,iproute2,iptables,nftables,conntrack,procps,python3,tcpdump,socat,strace
image_version=3
timeout_min=${PORTFWD_VM_TIMEOUT_MIN:-45}

filters=() skips=() lab=true suites=() exec_cmd=
while [ $# -gt 0 ]; do
  case $1 in
    --test) filters+=("$2"); shift 2 ;;
    --skip) skips+=("$2"); shift 2 ;;
    --no-lab) lab=false; shift ;;
    --exec) exec_cmd=$2; shift 2 ;;
    bullseye|bookworm) suites+=("$1"); shift ;;
    *) echo "vm: unknown argument '$1' (suites: bullseye, bookworm; options: --test F, --skip F, --no-lab)" >&2; exit 2 ;;
  esac
done
[ ${#suites[@]} -gt 0 ] || { echo "vm: name a suite: bullseye or bookworm" >&2; exit 2; }
for tool in debootstrap mke2fs qemu-system-x86_64; do
  command -v "$tool" >/dev/null || { echo "vm: $tool not found (scripts/setup.sh --all installs it)" >&2; exit 1; }
done

# The image: Debian's kernel and initrd beside an ext4 root made without mounting anything.
image() {
  local suite=$1 dir=$cache/$1
  local stamp="v$image_version $suite $packages"
  if [ -f "$dir/stamp" ] && [ "$(cat "$dir/stamp")" = "$stamp" ]; then
    return
  fi
  echo "vm: building the $suite image in $dir (debootstrap)"
  rm -rf "$dir"
  mkdir -p "$dir"
  local root=$dir/root
  debootstrap --variant=minbase --include="$packages" "$suite" "$root" http://deb.debian.org/debian \
    >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
  # The first process: mounts the shares under /portfwd and runs the guest script from
  # there, so the script changes without a new image.
  cat >"$root/sbin/portfwd-vm-init" <<'INIT'
#!/bin/sh
# The initramfs has moved these over already.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe 9pnet_virtio
modprobe 9p
mkdir -p /portfwd/src /portfwd/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,ro src /portfwd/src
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 out /portfwd/out
exec /bin/sh /portfwd/src/scripts/vm-guest.sh
INIT
  chmod 755 "$root/sbin/portfwd-vm-init"
  cp "$root"/boot/vmlinuz-* "$dir/vmlinuz"
  cp "$root"/boot/initrd.img-* "$dir/initrd.img"
  chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' \
    'linux-image-[0-9]*' iptables nftables iproute2 conntrack >"$dir/versions"
  rm -f "$root"/var/cache/apt/archives/*.deb
  mke2fs -q -t ext4 -L portfwd-root -d "$root" "$dir/root.img" 3G
  rm -rf "$root"
  echo "$stamp" >"$dir/stamp"
}

# KVM when a guest boots with it within seconds (on some hosts /dev/kvm exists and the guest
# hangs in the firmware), else TCG.
accel() {
  local kernel=$1
  if [ -w /dev/kvm ] && timeout 20 qemu-system-x86_64 -accel kvm -cpu max -m 256 -kernel "$kernel" \
    -append "console=ttyS0 panic=-1" -no-reboot -display none -monitor none -serial stdio \
    -nic none </dev/null 2>/dev/null | grep -q -m1 'Linux version'; then
    echo kvm
  else
    echo tcg
  fi
}

# The static binaries the guest runs; paths relative to the source tree.
stage() {
  local target=x86_64-unknown-linux-musl
  portfwd_bin=$(bash scripts/build-release.sh)
  cargo build --quiet --target "$target" -p portfwd-harness --bin portfwd-lab
  lab_bin=target/$target/debug/portfwd-lab
  e2e_bin=$(cargo test --no-run --target "$target" -p portfwd-e2e --test e2e 2>&1 |
    sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
  [ -n "$e2e_bin" ] && [ -x "$e2e_bin" ] || { echo "vm: building the e2e test binary failed" >&2; exit 1; }
}

run_suite() {
  local suite=$1 dir=$cache/$1 out=$repo/target/vm/$1
  rm -rf "$out"
  mkdir -p "$out"
  local mode
  mode=$(accel "$dir/vmlinuz")
  local skip_args="--skip ansible:: --skip salt:: --skip packaging:: --skip fleet::"
  for s in "${skips[@]}"; do skip_args+=" --skip $s"; done
  {
    echo "suite=$suite"
    echo "accel=$mode"
    echo "portfwd_bin=$repo/$portfwd_bin"
    echo "lab_bin=$repo/$lab_bin"
    echo "e2e_bin=$repo/$e2e_bin"
    echo "e2e_args='${filters[*]} $skip_args'"
    echo "lab=$lab"
  } >"$out/run.env"
  [ -z "$exec_cmd" ] || printf '%s\n' "$exec_cmd" >"$out/exec.sh"
  # Under TCG a plain CPU model runs the tests faster than `max` (no emulated AVX), and a
  # larger translation cache keeps the code of the many short-lived tools translated;
  # mitigations=off spares the emulated page-table switches of every system call.
  local accel_opts=$mode,tb-size=1024 cpu=qemu64 extra=mitigations=off
  [ "$mode" = kvm ] && accel_opts=kvm cpu=max extra=
  echo "vm: $suite ($(tr '\n' ' ' <"$dir/versions")) under $mode"
  local start=$SECONDS rc=0
  timeout "$((timeout_min * 60))" qemu-system-x86_64 -accel "$accel_opts" -cpu "$cpu" -smp 2 -m 3072 \
    -no-reboot -display none -monitor none -serial stdio -nic none \
    -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 quiet $extra init=/sbin/portfwd-vm-init portfwd_src=$repo portfwd_out=$out" \
    -drive "file=$dir/root.img,if=virtio,format=raw,snapshot=on" \
    -virtfs "local,path=$repo,mount_tag=src,security_model=none,readonly=on" \
    -virtfs "local,path=$out,mount_tag=out,security_model=none" \
    -device virtio-rng-pci </dev/null 2>&1 | tee "$out/console.log" || rc=$?
  [ "$rc" -eq 0 ] || echo "vm: qemu exited with $rc (124: timed out after $timeout_min min)"
  echo "vm: $suite ran for $((SECONDS - start)) s under $mode"
  if [ -n "$exec_cmd" ]; then
    grep -q '^done=0$' "$out/status" 2>/dev/null
  else
    python3 scripts/vm-report.py "$suite" "$out"
  fi
}

for suite in "${suites[@]}"; do
  image "$suite"
done
stage
status=0
for suite in "${suites[@]}"; do
  run_suite "$suite" || status=1
done
exit $status
