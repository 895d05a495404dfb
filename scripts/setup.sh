#!/usr/bin/env bash
# Installs the Debian packages blx needs, only those missing (idempotent).
#   scripts/setup.sh run|test|bench
set -euo pipefail
case "${1:-run}" in
  run)   pkgs=(procps iproute2 g++ pkg-config clang libclang-dev qemu-system-x86 busybox-static lz4) ;;
  test)  pkgs=(procps iproute2 nftables g++ pkg-config clang libclang-dev qemu-system-x86 busybox-static lz4) ;;
  bench) pkgs=(procps iproute2 nftables g++ pkg-config serf bc time clang libclang-dev etcd-server etcd-client wrk curl
               qemu-system-x86 busybox-static lz4 python3) ;;
  *) echo "usage: $0 run|test|bench" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v cargo >/dev/null || { echo "blx needs Rust (cargo) 1.88 or newer: https://rustup.rs" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
# The default guest image (Debian's cloud kernel and a busybox initramfs) comes after the packages.
if [ ${#missing[@]} -eq 0 ]; then exec "$here/build-image.sh"; fi
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "blx setup: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
exec "$here/build-image.sh"
