#!/usr/bin/env bash
# Raft write benchmark: blx's KV API against etcd 3.4 (Debian `etcd-server`), 3 members each on
# 127.0.0.1, fsync on in both, the same wrk load against each leader in the same invocation.
#
#   scripts/bench-raft.sh BLX_BIN [SECONDS] [OTLP_SINK]     default 10 s per load
#
# For 1 and 64 keep-alive connections, prints writes/s, p50 and p99 latency of PUTs of a
# 64-byte value (blx: PUT /v1/kv/bench; etcd: POST /v3/kv/put through its JSON gateway).
# Twice: with each member's default threads (blx: one event loop; etcd: one per core), then with
# one thread per member for both (blx --threads 1, the same as its default; etcd GOMAXPROCS=1),
# since the six members share the cores. With BENCH_RAFT_ONLY=otlp, only the OTLP table below.
# With OTLP_SINK (the otlp-sink binary of the blx-tests crate), a second table: blx at 64
# connections with OTLP export off and on (spans, metrics and log records sent over
# http/protobuf to a sink on 127.0.0.1, which reads and discards them), with every trace kept
# and with 1% of traces (OTEL_TRACES_SAMPLER): three clusters, rows alternating between them,
# six rounds, then each one's median against export off.
set -euo pipefail
blx=${1:?usage: $0 BLX_BIN [SECONDS] [OTLP_SINK]}; D=${2:-10}; sink=${3:-}
for t in etcd etcdctl wrk python3; do command -v $t >/dev/null || { echo "missing $t: scripts/setup.sh bench" >&2; exit 2; }; done
work=$(mktemp -d)
cleanup() { exec 2>/dev/null; pkill -9 -f -- "$work" || true; rm -rf "$work"; }
trap cleanup EXIT
val=$(head -c 48 /dev/zero | base64 -w0)

run_wrk() { # connections url lua -> "rps p50 p99 errors"
  wrk -t"$(( $1 < 2 ? 1 : 2 ))" -c"$1" -d"${D}s" --latency -s "$3" "$2" >"$work/wrk.out" 2>&1
  python3 - "$work/wrk.out" <<'PY' || { sed 's/^/  wrk: /' "$work/wrk.out" >&2; echo "0 0 0 failed"; }
import re,sys
t=open(sys.argv[1]).read()
def ms(s):
    v,u=re.match(r"([\d.]+)(us|ms|s|m)$",s).groups(); v=float(v)
    return {"us": v/1000, "ms": v, "s": v*1000, "m": v*60000}[u]
rps=float(re.search(r"Requests/sec:\s+([\d.]+)",t).group(1))
p50=ms(re.search(r"^\s+50%\s+(\S+)",t,re.M).group(1)); p99=ms(re.search(r"^\s+99%\s+(\S+)",t,re.M).group(1))
e=re.search(r"Non-2xx or 3xx responses: (\d+)",t)
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {e.group(1) if e else 0}")
PY
}

# ---- blx ----------------------------------------------------------------------------------------
no_fifos() { for v in ${!fd_@}; do eval "exec ${!v}>&-"; done; }
net=40  # members i = 1..3 of a cluster listen on 127.0.0.(net+i)
start_blx() { # dir i [args]
  local d=$1 i=$2; shift 2
  # A cluster killed a moment ago may still hold the address (seen once): wait for it.
  while ss -Hlun "src 127.0.0.$((net+i)):7946" | grep -q .; do sleep 0.1; done
  # Without the sinks' fifos (fd_*): an agent holding one open would keep its sink from ending.
  ( no_fifos
    exec "$blx" agent --data-dir "$d/blx$i" --bind "127.0.0.$((net+i)):7946" --api "127.0.0.$((net+i)):7947" --name "b$i" --no-mdns "$@" \
  ) >"$d/blx$i.out" 2>"$d/blx$i.log" & disown
}
voters() { "$blx" status -o json --api "127.0.0.$((net+1)):7947" --data-dir "$d/blx1" 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); print(len(s["voters"]) if s["role"]=="leader" and not s["changing"] else 0)' 2>/dev/null || echo 0; }
blx_cluster() { # dir [agent args]
  local d=$1; shift
  start_blx "$d" 1 "$@"
  until [ -s "$d/blx1.out" ]; do sleep 0.05; done
  local token; token=$(head -n1 "$d/blx1.out")
  start_blx "$d" 2 --token "$token" --seed "127.0.0.$((net+1)):7946" "$@"
  start_blx "$d" 3 --token "$token" --seed "127.0.0.$((net+1)):7946" "$@"
  until [ "$(voters)" = 3 ]; do sleep 0.2; done
}
blx_lua() { # dir: the load, with the first member's local API token
  printf 'wrk.method = "PUT"\nwrk.body = "%s"\nwrk.headers["Authorization"] = "Bearer %s"\n' \
    "$val" "$(cat "$1/blx1/api.token")" >"$work/blx.lua"
}

# The write path's stages over one row: the leader's and one follower's histograms scraped
# before and after, and for each the mean and the bucket the 99th percentile falls in.
scrape() { # file: the leader's metrics in it, a follower's in file.follower
  curl -s "http://127.0.0.$((net+1)):7947/v1/metrics" >"$1"
  curl -s "http://127.0.0.$((net+2)):7947/v1/metrics" >"$1.follower"
}
stages() { # before after
  python3 - "$1" "$2" <<'PY'
import re,sys
def parse(path):
    h={}
    for line in open(path):
        m=re.match(r'(blx_(?:raft|api)_\w+?)_(bucket|sum|count)(\{.*\})? (\S+)$',line.strip())
        if not m: continue
        name,kind,labels,v=m.groups(); labels=labels or ""
        key=name+re.sub(r',?le="[^"]*"','',labels).replace("{,","{").replace("{}","")
        e=h.setdefault(key,{"b":{}})
        if kind=="bucket": e["b"][float(re.search(r'le="([^"]+)"',labels).group(1).replace("+Inf","inf"))]=float(v)
        else: e[kind]=float(v)
    return h
rows=[("queued for a slot","blx_raft_proposal_queue_duration_seconds",1e3,"ms"),
      ("writes per entry","blx_raft_entry_writes",1,""),
      ("entry: sync, replicate, commit, apply","blx_raft_entry_duration_seconds",1e3,"ms"),
      ("leader log sync (fsync)","blx_raft_fsync_duration_seconds",1e3,"ms"),
      ("append to a follower, sent to answered","blx_raft_append_sent_duration_seconds",1e3,"ms"),
      ("apply waits for own log","blx_raft_apply_wait_duration_seconds",1e3,"ms"),
      ("apply","blx_raft_apply_duration_seconds",1e3,"ms"),
      ("write, queue to answer","blx_raft_commit_duration_seconds",1e3,"ms"),
      ("API request, in the agent","blx_api_request_duration_seconds{route=\"/v1/kv/{*key}\",method=\"PUT\"}",1e3,"ms")]
follower=[("follower: append, decoded to answered","blx_raft_append_served_duration_seconds",1e3,"ms"),
          ("follower: its log sync (fsync)","blx_raft_fsync_duration_seconds",1e3,"ms")]
print("  | stage | count | mean | p99 at most |")
print("  |---|---|---|---|")
for files,rows in (((sys.argv[1],sys.argv[2]),rows),((sys.argv[1]+".follower",sys.argv[2]+".follower"),follower)):
  a,b=parse(files[0]),parse(files[1])
  for label,name,k,u in rows:
      if name not in b: continue
      a.setdefault(name,{"b":{},"count":0.0,"sum":0.0})
      n=b[name]["count"]-a[name]["count"]
      if n<=0: continue
      mean=(b[name]["sum"]-a[name]["sum"])/n
      p99="-"
      for le in sorted(b[name]["b"]):
          if b[name]["b"][le]-a[name]["b"].get(le,0)>=0.99*n: p99=le; break
      f=lambda v: f"{v*k:.2f} {u}".strip() if v!="-" and v!=float("inf") else str(v)
      print(f"  | {label} | {n:.0f} | {f(mean)} | {f(p99)} |")
PY
}

# ---- etcd ---------------------------------------------------------------------------------------
etcd_cluster() { # dir -> the leader's client address in $eleader
  local d=$1 cluster="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
  for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$d/e$i" \
      --listen-client-urls "http://127.0.0.1:${i}2379" --advertise-client-urls "http://127.0.0.1:${i}2379" \
      --listen-peer-urls "http://127.0.0.1:${i}2380" --initial-advertise-peer-urls "http://127.0.0.1:${i}2380" \
      --initial-cluster "$cluster" --initial-cluster-state new --log-level error >"$d/e$i.log" 2>&1 & disown
  done
  local eps="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"
  until ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status >/dev/null 2>&1; do sleep 0.2; done
  eleader=$(ETCDCTL_API=3 etcdctl --endpoints "$eps" endpoint status -w json | python3 -c '
import json,sys
for e in json.load(sys.stdin):
    if e["Status"]["header"]["member_id"] == e["Status"]["leader"]: print(e["Endpoint"])')
}
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' \
  "'{\"key\":\"$(printf bench | base64)\",\"value\":\"$val\"}'" >"$work/etcd.lua"

if [ "${BENCH_RAFT_ONLY:-}" != otlp ]; then
echo "raft write benchmark: 3 members each on 127.0.0.1, wrk ${D}s per row, $(nproc) cores"
echo
echo "| threads per member | system | connections | writes/s | p50 (ms) | p99 (ms) | errors |"
echo "|---|---|---|---|---|---|---|"
for threads in default 1; do
  d="$work/$threads"; mkdir -p "$d"
  if [ "$threads" = default ]; then
    blx_cluster "$d"; etcd_cluster "$d"
  else
    blx_cluster "$d" --threads 1; GOMAXPROCS=1 etcd_cluster "$d"
  fi
  blx_lua "$d"
  for c in 1 64; do
    scrape "$work/before.prom"
    read -r r p50 p99 e < <(run_wrk "$c" "http://127.0.0.41:7947/v1/kv/bench" "$work/blx.lua")
    echo "| $threads | blx  | $c | $r | $p50 | $p99 | $e |"
    scrape "$work/after.prom"; stages "$work/before.prom" "$work/after.prom" >"$work/stages-$threads-$c.md"
    read -r r p50 p99 e < <(run_wrk "$c" "http://$eleader/v3/kv/put" "$work/etcd.lua")
    echo "| $threads | etcd | $c | $r | $p50 | $p99 | $e |"
  done
  pkill -9 -f -- "$d/" || true
  while pgrep -f -- "$d/" >/dev/null; do sleep 0.1; done
done

for threads in default 1; do for c in 1 64; do
  echo; echo "blx write path at $c connection(s), $threads threads per member (from the leader's and one follower's histograms):"; echo
  cat "$work/stages-$threads-$c.md"
done; done
fi

[ -n "$sink" ] || exit 0
# Three clusters side by side, each idle while another is measured: export off (127.0.0.41-43),
# on with every trace kept (.51-.53, to a sink on port 4318) and on with 1% of traces (.61-.63,
# a sink on 4319). The rows alternate between them, so drift in the machine falls on all three.
modes="off on on-1%"
declare -A base=([off]=40 [on]=50 [on-1%]=60) port=([on]=4318 [on-1%]=4319) sinkpid=()
for mode in $modes; do
  d="$work/otlp-$mode"; mkdir -p "$d"; net=${base[$mode]}
  if [ "$mode" = off ]; then blx_cluster "$d"; continue; fi
  mkfifo "$d/sink.in"
  ( no_fifos; exec "$sink" "${port[$mode]}" ) <"$d/sink.in" >"$d/sink.out" 2>&1 & sinkpid[$net]=$!
  eval "exec {fd_$net}>\"\$d/sink.in\""
  sampler=always_on; [ "$mode" = on-1% ] && sampler=parentbased_traceidratio
  (export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:${port[$mode]}" OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
     OTEL_TRACES_SAMPLER=$sampler OTEL_TRACES_SAMPLER_ARG=0.01; blx_cluster "$d")
done
# CPU time (user and system, clock ticks) of the processes whose command line holds $1: the
# three agents of a cluster, found by their data dirs. Throughput on this shared 2-core machine
# drifts by tens of percent from one row to the next; the agents' CPU per write drifts far less,
# so the table shows both.
cpu_ticks() {
  local t=0 p
  for p in $(pgrep -f -- "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo "$t"
}
hz=$(getconf CLK_TCK)
dropped() { # the leader's dropped-telemetry counters, summed
  curl -s "http://127.0.0.$((net+1)):7947/v1/metrics" | awk '/^blx_telemetry_dropped_total/ {s+=$2} END {print s+0}'
}
echo
echo "OTLP export off and on, blx at 64 connections, default threads, wrk ${D}s per row"
echo
echo "| round | export | writes/s | p50 (ms) | p99 (ms) | errors | dropped | agents' CPU per write (us) |"
echo "|---|---|---|---|---|---|---|---|"
declare -A all=() cpu=()
# The warm-up round is printed but not counted. Each round starts one mode later than the one
# before, so every mode follows every other equally often: what a row leaves behind (RocksDB
# compactions, a sink's backlog) then weighs on all three alike.
order=($modes)
for round in warm-up 1 2 3 4 5 6; do
  for mode in "${order[@]}"; do
    d="$work/otlp-$mode"; net=${base[$mode]}
    blx_lua "$d"
    t0=$(cpu_ticks "$d/blx")
    read -r r p50 p99 e < <(run_wrk 64 "http://127.0.0.$((net+1)):7947/v1/kv/bench" "$work/blx.lua")
    us=$(python3 -c "print(f'{($(cpu_ticks "$d/blx") - $t0) * 1e6 / $hz / max(1, $r * $D):.1f}')")
    [ "$round" = warm-up ] || { all[$mode]+="$r "; cpu[$mode]+="$us "; }
    echo "| $round | $mode | $r | $p50 | $p99 | $e | $(dropped) | $us |"
  done
  order=("${order[@]:1}" "${order[0]}")
done
echo
echo "| export | median writes/s | against off | median agents' CPU per write (us) | against off | received by the sink |"
echo "|---|---|---|---|---|---|"
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (v[int((NR+1)/2)]+v[int(NR/2)+1])/2}'; }
off=$(median ${all[off]}); offcpu=$(median ${cpu[off]})
for mode in $modes; do
  net=${base[$mode]}; got="-"
  med=$(median ${all[$mode]}); medcpu=$(median ${cpu[$mode]})
  if [ "$mode" != off ]; then
    pkill -9 -f -- "$work/otlp-$mode/" || true
    eval "exec {fd_$net}>&-"; wait "${sinkpid[$net]}" || true
    got=$(cat "$work/otlp-$mode/sink.out")
  fi
  echo "| $mode | $med | $(python3 -c "print(f'{($med/$off-1)*100:+.1f}%')") | $medcpu | $(python3 -c "print(f'{($medcpu/$offcpu-1)*100:+.1f}%')") | $got |"
done
