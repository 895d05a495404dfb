#!/usr/bin/env bash
# Runs a 3-agent blx cluster on loopback (127.0.0.11-13), each with its own data dir under
# .blx/local, and prints its member table. Stays up until Ctrl-C when run from a terminal.
#   scripts/local-cluster.sh path/to/blx
set -euo pipefail
blx=${1:?usage: $0 path/to/blx}
root=$PWD/.blx/local
pkill -9 -f -- "$root/" 2>/dev/null || true
rm -rf "$root"; mkdir -p "$root"
pids=()
cleanup() {
  "$blx" vm delete hello --api 127.0.0.11:7947 --data-dir "$root/n1" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  # VMs outlive their agent by design (a restarted agent adopts them); this demo's do not.
  pkill -9 -f -- "$root/" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
start() { # name ip [extra args...]
  local name=$1 ip=$2; shift 2
  "$blx" agent --data-dir "$root/$name" --bind "$ip:7946" --api "$ip:7947" --name "$name" --no-mdns "$@" \
    >"$root/$name.out" 2>"$root/$name.log" &
  pids+=($!)
}
start n1 127.0.0.11 --label zone=a
for _ in $(seq 100); do [ -s "$root/n1.out" ] && break; sleep 0.1; done
token=$(head -n1 "$root/n1.out")
[ -n "$token" ] || { echo "the first agent printed no token; see $root/n1.log" >&2; exit 1; }
start n2 127.0.0.12 --token "$token" --seed 127.0.0.11:7946 --label zone=b
start n3 127.0.0.13 --token "$token" --seed 127.0.0.11:7946 --label zone=c
for _ in $(seq 200); do
  [ "$("$blx" members --api 127.0.0.11:7947 --data-dir "$root/n1" 2>/dev/null | grep -c ' alive ')" = 3 ] && break; sleep 0.1
done
echo "== blx: 3 agents on loopback; member table from n1 (blx members --api 127.0.0.11:7947):"
"$blx" members --api 127.0.0.11:7947 --data-dir "$root/n1"
for _ in $(seq 300); do
  s=$("$blx" status -o json --api 127.0.0.11:7947 --data-dir "$root/n1" 2>/dev/null || true)
  s=$(echo "$s" | tr -d ' \n')
  [ "$(echo "$s" | grep -o '"voters":\[[0-9,]*\]' | tr -cd ',' | wc -c)" = 2 ] && echo "$s" | grep -q '"changing":false' && break
  sleep 0.1
done
echo "== Raft group, built by the autopilot with no operator step (blx status):"
"$blx" status --api 127.0.0.11:7947 --data-dir "$root/n1"
echo "== KV round trip: written through n3, read back through n2:"
"$blx" kv put greeting "hello from blx" --api 127.0.0.13:7947 --data-dir "$root/n3"
echo "blx kv get greeting -> $("$blx" kv get greeting --api 127.0.0.12:7947 --data-dir "$root/n2")"
echo "== a real microVM: QEMU -M microvm booting the default guest image (blx vm run hello):"
"$blx" vm run hello --memory 256MiB --api 127.0.0.11:7947 --data-dir "$root/n1"
echo "== VMs (blx vm list):"
"$blx" vm list --api 127.0.0.11:7947 --data-dir "$root/n1"
echo "== its serial console (blx vm logs hello):"
"$blx" vm logs hello --api 127.0.0.12:7947 --data-dir "$root/n2" | grep -a BLX_READY || { echo "no readiness line on the console" >&2; exit 1; }
echo "== nodes (blx node list):"
"$blx" node list --api 127.0.0.11:7947 --data-dir "$root/n1"
echo "== join token (blx join TOKEN --seed 127.0.0.11:7946 ...):"
echo "$token"
if [ -t 0 ]; then
  echo "== running; logs in $root/*.log; Ctrl-C stops the cluster"
  wait
fi
