#!/usr/bin/env bash
# VM boot benchmark: `blx vm run` of the default image (create to readiness line, through the
# scheduler, Raft and the worker) against a bare `qemu-system-x86_64 -M microvm` run of the same
# kernel and initramfs, in the same invocation, alternating so both see the same machine.
#
#   scripts/bench-vm-boot.sh BLX_BIN [RUNS]       default 10 runs each
#
# Bare QEMU: wall time from process start to the readiness line on its console. blx: wall time of
# `blx vm run NAME` (the CLI creates the VM and returns once the cluster reports it running).
# Both run the same QEMU flags: -M microvm, 256 MiB, 1 vCPU, -cpu qemu64 under TCG (host under KVM),
# whichever accel the agent's probe boot chose (TCG where KVM cannot boot the kernel).
set -euo pipefail
blx=${1:?usage: $0 BLX_BIN [RUNS]}; N=${2:-10}
for t in qemu-system-x86_64 python3; do command -v $t >/dev/null || { echo "missing $t: scripts/setup.sh bench" >&2; exit 2; }; done
here=$(cd "$(dirname "$0")" && pwd)
"$here/build-image.sh"
img=${BLX_IMAGE_DIR:-$HOME/.cache/blx/images}/default
work=$(mktemp -d)
cleanup() { exec 2>/dev/null; pkill -9 -f -- "$work" || true; rm -rf "$work"; }
trap cleanup EXIT
api=127.0.0.61:7947
"$blx" agent --data-dir "$work/n1" --bind 127.0.0.61:7946 --api $api --name bench --no-mdns >"$work/n1.out" 2>"$work/n1.log" &
for _ in $(seq 200); do "$blx" status --api $api --data-dir "$work/n1" >/dev/null 2>&1 && break; sleep 0.05; done
# Warm up: the first VM runs the KVM probe (cached afterwards) and pages QEMU in.
"$blx" vm run warmup --api $api --data-dir "$work/n1" >/dev/null
"$blx" vm delete warmup --api $api --data-dir "$work/n1" >/dev/null 2>&1
accel=$(cat "$work/n1/vms/accel" 2>/dev/null || echo "?")
python3 - "$blx" "$api" "$img" "$N" "$work" "$accel" <<'PY'
import json, os, signal, statistics, subprocess, sys, time
blx, api, img, n, work, accel = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6].strip()
khz = next(int(float(l.split(":")[1]) * 1000) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz"))
kvm = accel.lower().startswith("kvm")
def bare():
    cmd = ["qemu-system-x86_64", "-M", "microvm", "-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "qemu64",
           "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-serial", "stdio", "-kernel", f"{img}/vmlinux", "-initrd", f"{img}/initrd.img",
           "-append", f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={khz}"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    buf = b""
    while b"BLX_READY" not in buf:
        chunk = p.stdout.read1(4096)
        if not chunk: break
        buf += chunk
    t = time.monotonic() - t0 if b"BLX_READY" in buf else None
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    return t
def via_blx(i):
    name = f"b{i}"
    t0 = time.monotonic()
    r = subprocess.run([blx, "vm", "run", name, "--api", api, "--data-dir", f"{work}/n1", "-o", "json"], capture_output=True)
    t = time.monotonic() - t0
    ok = r.returncode == 0
    boot_ms = json.loads(r.stdout).get("boot_ms") if ok else None
    subprocess.run([blx, "vm", "delete", name, "--api", api, "--data-dir", f"{work}/n1"], capture_output=True)
    # Wait until the VM's QEMU is gone so runs do not overlap.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", f"{work}/n1/vms/{name}/"], capture_output=True).returncode == 0:
        time.sleep(0.05)
    return (t if ok else None), boot_ms
bares, blxs, worker = [], [], []
for i in range(n):
    b = bare(); bares.append(b)
    t, boot = via_blx(i); blxs.append(t); worker.append(boot)
ok_b = [x for x in bares if x]; ok_x = [x for x in blxs if x]
if not ok_b or not ok_x:
    print("boots failed: bare", bares, "blx", blxs); sys.exit(1)
mb, mx = statistics.median(ok_b), statistics.median(ok_x)
print(f"accel: {accel}, {n} runs each, alternating\n")
print("| pair | bare qemu (s) | blx vm run (s) | of which the worker's QEMU (s) |")
print("|---|---|---|---|")
cell = lambda x, scale=1: f"{x / scale:.3f}" if x else "failed"
for i, (b, t, boot) in enumerate(zip(bares, blxs, worker)):
    print(f"| {i + 1} | {cell(b)} | {cell(t)} | {cell(boot, 1000)} |")
print()
print("| | median (s) | min (s) | max (s) | ok |")
print("|---|---|---|---|---|")
print(f"| bare qemu, start to readiness line | {mb:.3f} | {min(ok_b):.3f} | {max(ok_b):.3f} | {len(ok_b)}/{n} |")
print(f"| blx vm run, create to running | {mx:.3f} | {min(ok_x):.3f} | {max(ok_x):.3f} | {len(ok_x)}/{n} |")
w = [x / 1000 for x in worker if x]
if w: print(f"| blx worker, QEMU start to readiness line | {statistics.median(w):.3f} | {min(w):.3f} | {max(w):.3f} | {len(w)}/{n} |")
print(f"\nblx adds {100 * (mx / mb - 1):+.1f}% to the bare boot (median against median)")
PY
