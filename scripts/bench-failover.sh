#!/usr/bin/env bash
# Failover benchmark: time from SIGKILL of the agent hosting a VM to that VM running on another
# node, with the process driver, over TRIALS kills of a 3-agent loopback cluster.
#
#   scripts/bench-failover.sh BLX_BIN [TRIALS]      default 20
#
# Each trial: find the VM's node, SIGKILL its agent (its workload keeps running, as a machine's
# would not; the restarted agent fences it), poll a surviving agent's API every 10 ms until the
# VM is running elsewhere, then restart the killed agent and wait for it to be alive again.
# Every other trial first recreates the VM with a preference for the Raft leader's node, so half
# the kills take the leader down with the VM and include an election.
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
def api(i, path, method="GET", body=None):
    deadline = time.monotonic() + 10  # a restarted agent takes a moment to open its API
    data = json.dumps(body).encode() if body is not None else None
    while True:
        try:
            token = open(f"{work}/n{i}/api.token").read().strip()  # the agent's local token
            req = urllib.request.Request(f"http://127.0.0.{70 + i}:7947{path}", data=data, method=method,
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline: raise
            time.sleep(0.02)
def last_vm():
    for i in (1, 2, 3):
        try: return api(i, "/v1/vms/job?stale")
        except Exception: pass
def wait(what, cond, within=60):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if cond(): return
        except Exception: pass
        time.sleep(0.01)
    sys.exit(f"timed out waiting for {what}: {last_vm()}")
start(1)
wait("token", lambda: open(f"{work}/n1.out").read().strip())
token = open(f"{work}/n1.out").read().split()[0]
for i in (2, 3): start(i, ["--token", token, "--seed", "127.0.0.71:7946"])
wait("3 voters", lambda: len(api(1, "/v1/status")["voters"]) == 3 and not api(1, "/v1/status")["changing"])
node_ids = {i: open(f"{work}/n{i}/node-id").read().strip() for i in (1, 2, 3)}
index = {v: k for k, v in node_ids.items()}
JOB = {"name": "job", "ready_marker": "READY", "command": ["sh", "-c", "echo READY; exec sleep 3600"]}
api(1, "/v1/vms", "POST", JOB)
wait("job running", lambda: api(1, "/v1/vms/job?stale")["phase"] == "running")
times = {"host": [], "leader and host": []}
leaderless = []
def alive(): return next(i for i in (1, 2, 3) if procs[i].poll() is None)
for trial in range(n):
    kind = "leader and host" if trial % 2 else "host"
    a = alive()
    # An agent that just restarted may not know the leader yet.
    wait("a leader", lambda: api(a, "/v1/status")["leader"] is not None)
    leader = index[api(a, "/v1/status")["leader"]]
    on = index[api(a, "/v1/vms/job")["node"]]
    if kind == "host" and on == leader:
        # Move the VM off the leader so this trial kills a follower only.
        follower = next(i for i in (1, 2, 3) if i != leader)
        api(a, "/v1/vms/job", "DELETE")
        api(a, "/v1/vms", "POST", dict(JOB, preferences=[f"node.name=n{follower}:100"]))
        wait("job running on a follower", lambda: api(a, "/v1/vms/job")["phase"] == "running"
             and index[api(a, "/v1/vms/job")["node"]] == follower)
    if kind == "leader and host":
        api(a, "/v1/vms/job", "DELETE")
        api(a, "/v1/vms", "POST", dict(JOB, preferences=[f"node.name=n{leader}:100"]))
        wait("job running on the leader", lambda: api(a, "/v1/vms/job")["phase"] == "running"
             and index[api(a, "/v1/vms/job")["node"]] == leader)
    # A linearizable read: an agent that just restarted may not have caught up yet.
    vm = api(alive(), "/v1/vms/job")
    host = index[vm["node"]]
    via = next(i for i in (1, 2, 3) if i != host)
    t0 = time.monotonic()
    procs[host].send_signal(signal.SIGKILL); procs[host].wait()
    def moved():
        v = api(via, "/v1/vms/job?stale")
        # The same VM (not one deleted before), placed anew, on another node.
        return (v["phase"] == "running" and v["create_index"] == vm["create_index"]
                and v["incarnation"] > vm["incarnation"] and v["node"] != vm["node"])
    wait("failover", moved)
    times[kind].append(time.monotonic() - t0)
    start(host)
    # Until the restarted agent is back and 2 s beyond, watch for a stretch without a leader
    # (a restarted voter that calls an election deposes the leader).
    longest = 0.0; since = None; back = None; deadline = time.monotonic() + 60
    while back is None or time.monotonic() < back + 2:
        if time.monotonic() > deadline: sys.exit(f"timed out waiting for n{host} to rejoin: {last_vm()}")
        try:
            st = api(via, "/v1/status"); now = time.monotonic()
            if st["leader"] is None:
                since = since or now; longest = max(longest, now - since)
            else:
                since = None
                if back is None and len(st["voters"]) == 3 and not st["changing"] and \
                        sum(m["state"] == "alive" for m in api(via, "/v1/members")) == 3:
                    back = now
        except Exception: pass
        time.sleep(0.01)
    leaderless.append(longest)
    print(f"trial {trial + 1}: killed n{host} ({kind}), running again after {times[kind][-1]:.2f} s; "
          f"longest without a leader after its restart {longest:.2f} s", file=sys.stderr)
def row(name, ts):
    ts = sorted(ts)
    p = lambda q: ts[min(len(ts) - 1, int(round(q * (len(ts) - 1))))]
    print(f"| {name} | {len(ts)} | {p(0.5):.2f} | {p(0.9):.2f} | {p(0.99):.2f} | {ts[-1]:.2f} |")
print(f"\n| killed | trials | p50 (s) | p90 (s) | p99 (s) | max (s) |\n|---|---|---|---|---|---|")
for k, ts in times.items():
    if ts: row(k, ts)
row("all", times["host"] + times["leader and host"])
print(f"\nlongest stretch without a leader after a restart, over {len(leaderless)} trials: {max(leaderless):.2f} s "
      f"(trials with none: {sum(g == 0 for g in leaderless)})")
PY
