#!/bin/sh
# Runs inside a test VM as its first process (scripts/vm.sh boots it): sets up what a booted
# Debian has (tmpfs, /dev links, loopback, module autoloading needs nothing more), runs the e2e
# suite and the lab scenarios with both backends, writes their output and exit codes to the
# out share, and powers off. $portfwd_src and $portfwd_out come from the kernel command line.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
# The source tree at the path it has on the host (the test binary's paths are compiled in),
# bound after the tmpfs mounts so a tree under /tmp stays visible.
mkdir -p "$portfwd_src" "$portfwd_out"
mount --bind /portfwd/src "$portfwd_src"
mount --bind /portfwd/out "$portfwd_out"
out=$portfwd_out
. "$out/run.env"
# udev makes these on a booted system; `nft -f -` opens /dev/stdin.
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# No udev here to load drivers for the devices: the entropy source.
modprobe virtio_rng 2>/dev/null
hostname portfwd-vm
ip link set lo up

# Binaries run from tmpfs, not through 9p.
mkdir -p /opt/portfwd
cp "$portfwd_bin" /opt/portfwd/portfwd
cp "$lab_bin" /opt/portfwd/portfwd-lab
cp "$e2e_bin" /opt/portfwd/e2e
export CI=true PORTFWD_BIN=/opt/portfwd/portfwd PORTFWD_LAB_BIN=/opt/portfwd/portfwd-lab
export PORTFWD_MODULE_BIN=/opt/portfwd/portfwd

{
  echo "kernel $(uname -r)"
  iptables --version
  nft --version
  ip -V
  conntrack --version
} >"$out/tools.txt" 2>&1
cat "$out/tools.txt"

cd "$portfwd_src" || exit 1
if [ -f "$out/exec.sh" ]; then
  sh "$out/exec.sh" 2>&1 | tee "$out/exec.txt"
  echo "done=$?" >"$out/status"
  sync
  echo o >/proc/sysrq-trigger
  sleep 10
fi
echo "vm-guest: e2e suite ($e2e_args)"
# shellcheck disable=SC2086 # e2e_args is a list of words
/opt/portfwd/e2e --test-threads=2 $e2e_args >"$out/e2e.txt" 2>&1
echo "e2e=$?" >"$out/status"
tail -n 5 "$out/e2e.txt"
if [ "$lab" = true ]; then
  # As on the host: each scenario's own backend, then nftables wherever one is not pinned.
  for backend in default nftables; do
    echo "vm-guest: lab scenarios, backend $backend"
    set --
    [ "$backend" = default ] || set -- --backend "$backend"
    /opt/portfwd/portfwd-lab run "$@" --junit "$out/lab-$backend.xml" >"$out/lab-$backend.txt" 2>&1
    echo "lab_$backend=$?" >>"$out/status"
    tail -n 1 "$out/lab-$backend.txt"
  done
fi
echo "done=1" >>"$out/status"
sync
echo o >/proc/sysrq-trigger
sleep 10
