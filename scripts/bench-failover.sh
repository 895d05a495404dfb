#!/usr/bin/env bash
# Failover benchmark: time from SIGKILL of the agent hosting a VM to that VM running on another
# node, with the process driver, over TRIALS kills of a 3-agent loopback cluster.
#
#   scripts/bench-failover.sh BLX_BIN [TRIALS]      default 20
#
# Each trial: find the VM's node, SIGKILL its agent (its workload keeps running, as a machine's
# would not; the restarted agent fences it), poll a surviving agent's API every 10 ms until the
# VM is running elsewhere, then restart the killed agent and wait for it to be alive again.
set -euo pipefail
blx=${1:?usage: $0 BLX_BIN [TRIALS]}; N=${2:-20}
command -v python3 >/dev/null || { echo "missing python3: scripts/setup.sh bench" >&2; exit 2; }
work=$(mktemp -d)
cleanup() { exec 2>/dev/null; pkill -9 -f -- "$work" || true; rm -rf "$work"; }
trap cleanup EXIT
python3 - "$blx" "$work" "$N" <<'PY'
import json, os, signal, statistics, subprocess, sys, time, urllib.request
blx, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
procs = {}
def start(i, extra=()):
    ip = f"127.0.0.{70 + i}"
    log = open(f"{work}/n{i}.log", "ab"); out = open(f"{work}/n{i}.out", "ab")
    procs[i] = subprocess.Popen([blx, "agent", "--data-dir", f"{work}/n{i}", "--bind", f"{ip}:7946", "--api", f"{ip}:7947",
                                 "--name", f"n{i}", "--no-mdns", *extra], stdout=out, stderr=log)
def api(i, path):
    with urllib.request.urlopen(f"http://127.0.0.{70 + i}:7947{path}", timeout=2) as r:
        return json.loads(r.read())
def wait(what, cond, within=60):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if cond(): return
        except Exception: pass
        time.sleep(0.01)
    sys.exit(f"timed out waiting for {what}")
start(1)
wait("token", lambda: open(f"{work}/n1.out").read().strip())
token = open(f"{work}/n1.out").read().split()[0]
for i in (2, 3): start(i, ["--token", token, "--seed", "127.0.0.71:7946"])
wait("3 voters", lambda: len(api(1, "/v1/status")["voters"]) == 3)
node_ids = {i: open(f"{work}/n{i}/node-id").read().strip() for i in (1, 2, 3)}
index = {v: k for k, v in node_ids.items()}
subprocess.run([blx, "vm", "create", "job", "--api", "127.0.0.71:7947", "--ready-marker", "READY", "--",
                "sh", "-c", "echo READY; exec sleep 3600"], check=True, capture_output=True)
wait("job running", lambda: api(1, "/v1/vms/job?stale")["phase"] == "running")
times = []
for trial in range(n):
    vm = api(1 if procs[1].poll() is None else 2, "/v1/vms/job?stale")
    host = index[vm["node"]]
    via = next(i for i in (1, 2, 3) if i != host)
    t0 = time.monotonic()
    procs[host].send_signal(signal.SIGKILL); procs[host].wait()
    def moved():
        v = api(via, "/v1/vms/job?stale")
        return v["phase"] == "running" and v["node"] != node_ids[host]
    wait("failover", moved)
    times.append(time.monotonic() - t0)
    start(host)
    wait("restarted agent alive", lambda: sum(m["state"] == "alive" for m in api(via, "/v1/members")) == 3)
    wait("raft back to 3 voters", lambda: len(api(via, "/v1/status")["voters"]) == 3 and api(via, "/v1/status")["leader"] is not None)
    print(f"trial {trial + 1}: killed n{host}, running again after {times[-1]:.2f} s", file=sys.stderr)
times.sort()
p = lambda q: times[min(len(times) - 1, int(round(q * (len(times) - 1))))]
print(f"\n| trials | p50 (s) | p90 (s) | p99 (s) | max (s) |\n|---|---|---|---|---|")
print(f"| {n} | {p(0.5):.2f} | {p(0.9):.2f} | {p(0.99):.2f} | {times[-1]:.2f} |")
PY
