#!/usr/bin/env bash
# 100 ansible.builtin.iptables tasks (the per-rule way) against one portfwd task with the same
# 100 forwards, both with the real ansible-playbook (connection local) inside a throwaway
# network namespace. Prints both times and the ratio. Needs root; run scripts/setup.sh --all.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PORTFWD_ANSIBLE_VENV:-${PORTFWD_CACHE:-$HOME/.cache/portfwd}/ansible-venv}
bin=${PORTFWD_MODULE_BIN:-$(bash scripts/build-release.sh)}
work=$(mktemp -d)
ns="pfl-$$-0-ansiblebench"
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
mkdir -p "$work/library"
cp "$bin" "$work/library/portfwd"
cp playbooks/library/portfwd.yml "$work/library/"
printf '[proxies]\nproxy ansible_connection=local ansible_python_interpreter=%s\n' "$venv/bin/python" > "$work/inventory"
{
  echo "- hosts: proxies"
  echo "  gather_facts: false"
  echo "  tasks:"
  for i in $(seq 0 99); do
    cat <<TASK
    - ansible.builtin.iptables:
        table: nat
        chain: PREROUTING
        protocol: tcp
        destination_port: "$((10000 + i))"
        jump: DNAT
        to_destination: "10.100.0.$((i + 1)):8080"
        comment: "fwd $i"
TASK
  done
} > "$work/per-rule.yml"
{
  echo "- hosts: proxies"
  echo "  gather_facts: false"
  echo "  tasks:"
  echo "    - portfwd:"
  echo "        allow_forward: false"
  echo "        forwards:"
  for i in $(seq 0 99); do
    echo "          - {name: f$i, listen_port: $((10000 + i)), to: \"10.100.0.$((i + 1)):8080\", snat: none, allow_forward: false}"
  done
} > "$work/portfwd.yml"
sed -i '/^        allow_forward: false$/d' "$work/portfwd.yml"
run() {
  local start end
  start=$(date +%s.%N)
  ip netns exec "$ns" env PATH="$venv/bin:$PATH" ANSIBLE_LIBRARY="$work/library" ANSIBLE_HOME="$work/home" \
    ANSIBLE_LOCAL_TEMP="$work/tmp" PORTFWD_LOCK_FILE="$work/lock" PORTFWD_RUN_DIR="$work/run" \
    PORTFWD_STATE_DIR="$work/state" ansible-playbook -i "$work/inventory" "$1" > "$work/out.log" 2>&1 \
    || { cat "$work/out.log"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.3f}')"
}
per_rule=$(run "$work/per-rule.yml")
rules=$(ip netns exec "$ns" iptables-save -t nat | grep -c -- '-A PREROUTING' || true)
ip netns exec "$ns" iptables -t nat -F PREROUTING
one_task=$(run "$work/portfwd.yml")
echo "100 forwards with ansible-playbook (connection local), one run each:"
printf "  100 ansible.builtin.iptables tasks: %6.2f s (%s rules)\n" "$per_rule" "$rules"
printf "  1 portfwd task:                     %6.2f s\n" "$one_task"
printf "  ratio:                              %6.1fx\n" "$(python3 -c "print($per_rule / $one_task)")"
