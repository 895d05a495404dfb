#!/usr/bin/env bash
# Scale benchmark: how the leader's load grows with the cluster, and how fast a client sees
# a write. For each size, a fresh loopback cluster (3 voters, 2 standbys by default, every
# other agent a client), then, in steady state:
#   leader_cpu_pct    the leader's CPU (user + system) over the window, in % of one core
#   leader_bytes_s    bytes the leader's gossip port sent and received per second (nftables)
#   agent_bytes_s     bytes per agent per second, every port of the cluster (nftables)
#   client_gossip_s   one client's gossip payload per second, and the rest of what it sent
#   client_rest_s     (control streams: watch, forwards), from its own counters
#   seen_p50/p99/max  200 writes through the leader's API, one after another: from sending
#                     each to a client's local copy (`?stale`) answering with it, in ms
#   vm_client/standby median of 20 process-driver VMs each (BENCH_SCALE_VMS sets how many),
#                     pinned (node.name=) alternately to a client and to a standby
#                     learner: from the create request to the
#                     leader reporting the VM running, in ms
# and the growth of the leader's CPU and bytes from the first size to the last.
#
#   scripts/bench-scale.sh BLX_BIN [SIZES] [SECONDS]     SIZES default "10 30", SECONDS 20
# Needs root (nftables) and python3. Everything is torn down on exit.
set -euo pipefail
blx=${1:?usage: $0 BLX_BIN [SIZES] [SECONDS]}
sizes=${2:-10 30}
secs=${3:-20}
vms=${BENCH_SCALE_VMS:-20}
case $vms in '' | *[!0-9]* | 0) echo "BENCH_SCALE_VMS must be a positive whole number, not '$vms'" >&2; exit 2 ;; esac
work=$(mktemp -d)
tbl="blxscale$$"
cleanup() { exec 2>/dev/null; pkill -9 -f -- "$work" || true; nft delete table inet "$tbl" || true; rm -rf "$work"; }
trap cleanup EXIT
command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }

BLX="$blx" WORK="$work" TBL="$tbl" SIZES="$sizes" SECS="$secs" VMS="$vms" python3 - <<'PY'
import http.client, json, os, re, subprocess, sys, time

BLX, WORK, TBL = os.environ["BLX"], os.environ["WORK"], os.environ["TBL"]
SIZES = [int(s) for s in os.environ["SIZES"].split()]
SECS = float(os.environ["SECS"])
VMS = int(os.environ["VMS"])
GOSSIP, API = 21000, 21500
TICK = os.sysconf("SC_CLK_TCK")

def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout

class Agent:
    def __init__(self, root, i, extra):
        self.i, self.dir = i, f"{root}/n{i}"
        self.gossip, self.api = GOSSIP + i, API + i
        self.out = open(f"{root}/n{i}.out", "w")
        self.proc = subprocess.Popen(
            [BLX, "agent", "--data-dir", self.dir, "--bind", f"127.0.0.1:{self.gossip}",
             "--api", f"127.0.0.1:{self.api}", "--name", f"n{i}", "--no-mdns", *extra],
            stdout=self.out, stderr=open(f"{root}/n{i}.log", "w"))
        self.conn = None

    def token(self):
        with open(f"{self.dir}/api.token") as f:
            return f.read().strip()

    def get(self, path, method="GET", body=None):
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.api, timeout=10)
                headers = {"Authorization": f"Bearer {self.token()}"}
                if body is not None:
                    headers["Content-Type"] = "application/json"
                self.conn.request(method, path, body=body, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.conn = None
        return 0, b""

    def status(self):
        code, body = self.get("/v1/status")
        return json.loads(body) if code == 200 else None

    def metrics(self):
        code, body = self.get("/v1/metrics")
        out = {}
        for line in body.decode().splitlines():
            m = re.match(r'^(blx_(?:gossip_sent_bytes_total|gossip_sent_datagrams_total|net_sent_bytes_total)(?:\{kind="(\w+)"\})?) (\S+)$', line)
            if m:
                out[m.group(1)] = float(m.group(3))
        return out

    def cpu(self):
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

def wait(what, cond, within=180):
    end = time.time() + within
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")

def nft_window(rules, secs):
    """Counts bytes for each (name, match) rule over `secs`; returns {name: bytes}."""
    subprocess.run(["nft", "delete", "table", "inet", TBL], capture_output=True)
    sh("nft", "add", "table", "inet", TBL)
    sh("nft", "add", "chain", "inet", TBL, "out", "{ type filter hook output priority 0; policy accept; }")
    for name, match in rules:
        sh("nft", "add", "rule", "inet", TBL, "out", *match.split(), "counter", "comment", f'"{name}"')
    time.sleep(secs)
    listing = sh("nft", "list", "table", "inet", TBL)
    sh("nft", "delete", "table", "inet", TBL)
    got = {}
    for line in listing.splitlines():
        m = re.search(r'counter packets \d+ bytes (\d+) comment "(\w+)"', line)
        if m:
            got[m.group(2)] = int(m.group(1))
    return got

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def run(n):
    root = f"{WORK}/c{n}"
    os.makedirs(root)
    agents = [Agent(root, 0, [])]
    wait("the first agent's token", lambda: os.path.getsize(f"{root}/n0.out") > 0)
    token = open(f"{root}/n0.out").readline().strip()
    for i in range(1, n):
        agents.append(Agent(root, i, ["--token", token, "--seed", f"127.0.0.1:{GOSSIP}"]))
    def settled():
        ss = [a.status() for a in agents]
        if any(s is None for s in ss):
            return False
        leaders = [s for s in ss if s["role"] == "leader"]
        if len(leaders) != 1:
            return False
        l = leaders[0]
        clients = sum(1 for s in ss if s["role"] == "client")
        return (not l["changing"] and len(l["voters"]) == 3 and len(l["learners"]) == min(2, n - 3)
                and clients == n - 3 - min(2, n - 3) and all(s["leader"] == l["id"] for s in ss))
    t0 = time.time()
    wait(f"{n} agents: 3 voters, 2 standbys, the rest clients", settled)
    settle_s = time.time() - t0
    time.sleep(5)
    ss = [a.status() for a in agents]
    leader = next(a for a, s in zip(agents, ss) if s["role"] == "leader")
    client = next(a for a, s in zip(agents, ss) if s["role"] == "client")
    before_cpu, before_m = leader.cpu(), client.metrics()
    t = time.time()
    counted = nft_window([
        ("leader_out", f"udp sport {leader.gossip}"),
        ("leader_in", f"udp dport {leader.gossip}"),
        ("all", f"udp sport {GOSSIP}-{GOSSIP + n - 1}"),
    ], SECS)
    window = time.time() - t
    cpu = (leader.cpu() - before_cpu) / window * 100
    after_m = client.metrics()
    delta = {k: after_m.get(k, 0) - before_m.get(k, 0) for k in after_m}
    gossip = delta.get("blx_gossip_sent_bytes_total", 0) / window
    rest = sum(v for k, v in delta.items() if k.startswith("blx_net_sent_bytes_total")) / window
    seen = []
    for i in range(200):
        key = f"/v1/kv/scale/k{i}"
        start = time.perf_counter()
        code, body = leader.get(key, "PUT", b"v")
        if code != 200:
            sys.exit(f"write {i} through the leader: {code} {body!r}")
        while client.get(key + "?stale")[0] != 200:
            if time.perf_counter() - start > 10:
                sys.exit(f"the client never saw write {i}")
        seen.append((time.perf_counter() - start) * 1000)
    standby = next(a for a, s in zip(agents, ss) if s["role"] == "learner")
    def boot(target, k):
        name = f"scale-{target.i}-{k}"
        spec = {"name": name, "command": ["sh", "-c", "echo READY; exec sleep 600"],
                "ready_marker": "READY", "constraints": [f"node.name=n{target.i}"]}
        start = time.perf_counter()
        code, body = leader.get("/v1/vms", "POST", json.dumps(spec).encode())
        if code not in (200, 201):
            sys.exit(f"creating {name}: {code} {body!r}")
        while True:
            code, body = leader.get(f"/v1/vms/{name}")
            if code == 200 and json.loads(body).get("phase") == "running":
                break
            if time.perf_counter() - start > 30:
                sys.exit(f"{name} never ran: {body!r}")
            time.sleep(0.005)
        took = (time.perf_counter() - start) * 1000
        leader.get(f"/v1/vms/{name}", "DELETE")
        return took
    on_client, on_standby = [], []
    for k in range(VMS):
        on_client.append(boot(client, k))
        on_standby.append(boot(standby, k))
    for a in agents:
        a.proc.kill()
    for a in agents:
        a.proc.wait()
    return dict(n=n, settle=settle_s, cpu=cpu, vm_client=pct(on_client, 50), vm_standby=pct(on_standby, 50),
                leader=(counted.get("leader_out", 0) + counted.get("leader_in", 0)) / window,
                agent=counted.get("all", 0) / window / n, gossip=gossip, rest=rest,
                p50=pct(seen, 50), p99=pct(seen, 99), max=max(seen))

print(f"scale benchmark: loopback, {os.cpu_count()} cores, {SECS:.0f} s windows, 3 voters and 2 standbys")
print(f"{'agents':>6} {'settle_s':>8} {'leader_cpu_pct':>14} {'leader_bytes_s':>14} {'agent_bytes_s':>13} "
      f"{'client_gossip_s':>15} {'client_rest_s':>13} {'seen_p50_ms':>11} {'seen_p99_ms':>11} {'seen_max_ms':>11} "
      f"{'vm_client_ms':>12} {'vm_standby_ms':>13}")
rows = []
for n in SIZES:
    r = run(n)
    rows.append(r)
    print(f"{r['n']:>6} {r['settle']:>8.1f} {r['cpu']:>14.2f} {r['leader']:>14.0f} {r['agent']:>13.0f} "
          f"{r['gossip']:>15.0f} {r['rest']:>13.0f} {r['p50']:>11.2f} {r['p99']:>11.2f} {r['max']:>11.2f} "
          f"{r['vm_client']:>12.1f} {r['vm_standby']:>13.1f}", flush=True)
if len(rows) > 1:
    a, b = rows[0], rows[-1]
    print(f"\nfrom {a['n']} to {b['n']} agents: leader CPU x{b['cpu'] / max(a['cpu'], 1e-9):.2f}, "
          f"leader bytes x{b['leader'] / max(a['leader'], 1e-9):.2f}")
PY
