#!/usr/bin/env bash
# Builds blx's default guest image from Debian packages: the uncompressed kernel of
# linux-image-cloud-amd64 (microvm boots it through its PVH entry) and a busybox initramfs whose
# init prints the readiness line BLX_READY on the serial console.
#
#   scripts/build-image.sh [OUT_DIR]     default ${BLX_IMAGE_DIR:-$HOME/.cache/blx/images}/default
#
# The kernel package is downloaded and unpacked, never installed: its boot hooks have no business
# on a build machine. Idempotent: an image that is already complete is left as it is.
set -euo pipefail
out=${1:-${BLX_IMAGE_DIR:-$HOME/.cache/blx/images}/default}
if [ -s "$out/vmlinux" ] && [ -s "$out/initrd.img" ] && [ -s "$out/image.json" ]; then exit 0; fi
for tool in apt-get dpkg lz4 busybox gzip; do
  command -v "$tool" >/dev/null || { echo "build-image: missing $tool (scripts/setup.sh installs it)" >&2; exit 1; }
done
kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
pkg=$(kernel_pkg)
if [ -z "$pkg" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "build-image: apt knows no linux-image-cloud-amd64 (is this Debian amd64?)" >&2; exit 1; }
work=$(mktemp -d); chmod 755 "$work"; trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
echo "build-image: fetching $pkg" >&2
(cd "$work" && apt-get download -qq "$pkg" >/dev/null)
dpkg -x "$work"/"$pkg"_*.deb "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-*)
# The bzImage holds an LZ4 frame; microvm boots the extracted vmlinux about 0.2 s faster.
off=$(grep -obUaP '\x02\x21\x4c\x18' "$vmlinuz" | head -1 | cut -d: -f1)
[ -n "$off" ] || { echo "build-image: no LZ4 frame in $vmlinuz" >&2; exit 1; }
tail -c +$((off + 1)) "$vmlinuz" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
[ -s "$work/vmlinux" ] || { echo "build-image: could not decompress $vmlinuz" >&2; exit 1; }
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp}
cp /bin/busybox "$root/bin/busybox"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "BLX_READY $(uname -r) $(nproc) cpu $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
while :; do sleep 3600; done
INIT
chmod 755 "$root/init" "$root/bin/busybox"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$work/initrd.img"
version=${pkg#linux-image-}
cat > "$work/image.json" <<JSON
{"name":"default","kernel":"vmlinux","initrd":"initrd.img","ready_marker":"BLX_READY","kernel_version":"$version"}
JSON
mv "$work/vmlinux" "$work/initrd.img" "$out/"
mv "$work/image.json" "$out/image.json"
echo "build-image: $out (kernel $version)" >&2
