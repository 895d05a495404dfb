#!/usr/bin/env bash
# Membership benchmark: blx against HashiCorp Serf (Debian package `serf`), same method, same
# machine, same invocation.
#
#   scripts/bench-membership.sh BLX_BIN [NODES] [RUNS]        NODES default 10, RUNS default 3
#   scripts/bench-membership.sh BLX_BIN --soak SECONDS LOSS%  blx under packet loss: false downs
#
# For each system and run, on 127.0.0.1:
#   converge_s        from starting the last member (blx: launching `blx join`; serf: `serf join`)
#                     until every member lists NODES alive
#   detect_s          from SIGKILL of the last member until every survivor lists it down/failed
#   bytes_per_agent_s bytes the members send to each other, per member per second, over a 30 s
#                     window of steady state (BENCH_MEMBERSHIP_WINDOW=SECONDS changes it),
#                     counted by the same nftables rules for both: every UDP and TCP packet from a member's port,
#                     and every packet to a member's port from another port (the side of a
#                     TCP connection a member opens from an ephemeral port: Serf's push-pull).
#                     30 s is Serf's push-pull period on the LAN profile, so each Serf member
#                     starts one push-pull in the window; a shorter window mostly misses them.
#                     blx is measured once its Raft group has stopped changing (3 s unchanged;
#                     the time that takes is printed)
#   gossip_s, rest_s  that split into failure detection and everything else. Serf: UDP (its
#                     gossip) and TCP (push-pull). blx, whose every byte is QUIC on UDP: its SWIM
#                     datagrams as the agents count them, each with 53 bytes of IP, UDP and QUIC
#                     framing (4-byte connection ids), and the rest (Raft, client watches)
# BENCH_MEMBERSHIP_KEEP=DIR keeps each blx run's agent logs in DIR/blx-NODES-HHMMSS, with the
# kill's time in `killed_at`, to read an outlier afterwards.
# Needs root (nftables). Everything is torn down on exit.
set -euo pipefail
blx=${1:?usage: $0 BLX_BIN [NODES] [RUNS] | BLX_BIN --soak SECONDS LOSS}
shift
work=$(mktemp -d); pids=(); tbl="blxbench$$"
# Members run in subshells too, so find them by their arguments rather than by pid.
cleanup() { exec 2>/dev/null; pkill -9 -f -- "$work" || true; pkill -9 -f -- "blxbench=$$" || true; nft delete table inet "$tbl" || true; rm -rf "$work"; }
trap cleanup EXIT
now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
WINDOW=${BENCH_MEMBERSHIP_WINDOW:-30}
KEEP=${BENCH_MEMBERSHIP_KEEP:-}
count_bytes() { # first_port last_port seconds -> "udp_bytes tcp_bytes" the members on those ports sent
  local r="$1-$2"
  nft delete table inet "$tbl" 2>/dev/null || true
  nft add table inet "$tbl"
  nft add chain inet "$tbl" out '{ type filter hook output priority 0; policy accept; }'
  # From a member's port, or to a member's port from a port of its own (every member is local).
  nft add rule inet "$tbl" out udp sport "$r" counter
  nft add rule inet "$tbl" out udp dport "$r" udp sport != "$r" counter
  nft add rule inet "$tbl" out tcp sport "$r" counter
  nft add rule inet "$tbl" out tcp dport "$r" tcp sport != "$r" counter
  sleep "$3"
  nft list table inet "$tbl" | sed -n 's/.*counter packets [0-9]* bytes \([0-9]*\).*/\1/p' |
    awk '{b[NR]=$1} END {print b[1] + b[2], b[3] + b[4]}'
  nft delete table inet "$tbl"
}
# Sum over agents 0..n-1 of SWIM datagram bytes plus 53 bytes of framing per datagram sent.
blx_gossip_total() {
  local n=$1 total=0 i
  for i in $(seq 0 $((n-1))); do
    total=$(curl -s "http://127.0.0.1:$((BLX_API+i))/v1/metrics" | awk -v t="$total" '
      /^blx_gossip_sent_bytes_total / {b=$2} /^blx_gossip_sent_datagrams_total / {d=$2}
      END {printf "%d", t + b + 53 * d}')
  done
  echo "$total"
}
kill_all() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }

# ---- blx -------------------------------------------------------------------------------------
BLX_GOSSIP=${BLX_GOSSIP:-19000}; BLX_API=${BLX_API:-19500}
blx_members() { "$blx" members --api "127.0.0.1:$((BLX_API+$1))" --data-dir "$work/blx/n$1" -o json 2>/dev/null || echo "[]"; }
blx_count() { blx_members "$1" | grep -c "\"state\": \"$2\"" || true; }
blx_start() { # i [args...]
  local i=$1; shift
  "$blx" agent --data-dir "$work/blx/n$i" --bind "127.0.0.1:$((BLX_GOSSIP+i))" --api "127.0.0.1:$((BLX_API+i))" \
    --name "n$i" --no-mdns "$@" >"$work/blx/n$i.out" 2>"$work/blx/n$i.log" &
  pids+=($!)
}
blx_cluster() { # n -> starts n agents; sets CONV to the convergence time
  local n=$1; rm -rf "$work/blx"; mkdir -p "$work/blx"
  blx_start 0
  for _ in $(seq 200); do [ -s "$work/blx/n0.out" ] && break; sleep 0.05; done
  token=$(head -n1 "$work/blx/n0.out")
  for i in $(seq 1 $((n-2))); do blx_start "$i" --token "$token" --seed "127.0.0.1:$BLX_GOSSIP"; done
  for i in $(seq 0 $((n-2))); do until [ "$(blx_count "$i" alive)" -eq $((n-1)) ]; do sleep 0.02; done; done
  local t0; t0=$(now)
  blx_start $((n-1)) --token "$token" --seed "127.0.0.1:$BLX_GOSSIP"
  for i in $(seq 0 $((n-1))); do until [ "$(blx_count "$i" alive)" -eq "$n" ]; do sleep 0.02; done; done
  CONV=$(elapsed "$t0")
}
# Until the Raft group stops changing: the autopilot adds standbys and promotes voters for some
# seconds after the last join. Background traffic is measured once it has settled.
blx_settle() { # -> seconds waited
  local t0 last="" same=0 now
  t0=$(now)
  while [ "$same" -lt 6 ]; do
    now=$("$blx" status --api "127.0.0.1:$BLX_API" --data-dir "$work/blx/n0" -o json 2>/dev/null |
      tr -d ' \n' | sed -n 's/.*"changing":\(false\|true\).*"learners":\(\[[^]]*\]\).*"voters":\(\[[^]]*\]\).*/\1 \2 \3/p')
    if [ -n "$now" ] && [ "$now" = "$last" ] && [ "${now%% *}" = false ]; then same=$((same + 1)); else same=0; fi
    last=$now; sleep 0.5
  done
  elapsed "$t0"
}
blx_run() { # n -> "converge bytes detect gossip rest"
  local n=$1 conv bytes t0 udp tcp g0 g1 gossip
  blx_cluster "$n"; conv=$CONV
  SETTLE=$(blx_settle); echo "blx: the Raft group settled ${SETTLE}s after convergence" >&2
  g0=$(blx_gossip_total "$n")
  read -r udp tcp < <(count_bytes "$BLX_GOSSIP" $((BLX_GOSSIP+n-1)) "$WINDOW")
  g1=$(blx_gossip_total "$n")
  bytes=$((udp + tcp)); gossip=$(( (g1 - g0) / n / WINDOW ))
  local last=$((n-1)); kill -9 "${pids[$last]}"; t0=$(now)
  for i in $(seq 0 $((n-2))); do
    until blx_members "$i" | tr -d ' \n' | grep -q "\"name\":\"n$last\",\"addr\":\"[0-9.:]*\",\"state\":\"down\""; do sleep 0.02; done
  done
  local detect; detect=$(elapsed "$t0")
  if [ -n "$KEEP" ]; then
    local k; k="$KEEP/blx-$n-$(date +%H%M%S)"; mkdir -p "$k"
    cp "$work"/blx/*.log "$k"/; echo "$t0" >"$k/killed_at"
  fi
  echo "$conv $((bytes / n / WINDOW)) $detect $gossip $((bytes / n / WINDOW - gossip))"
  kill_all
}

# ---- serf ------------------------------------------------------------------------------------
SERF_BIND=17946; SERF_RPC=17373
serf_count() { serf members -rpc-addr "127.0.0.1:$((SERF_RPC+$1))" -status "$2" 2>/dev/null | wc -l; }
serf_run() { # n -> "converge bytes detect gossip rest"
  local n=$1 t0 conv bytes udp tcp
  for i in $(seq 0 $((n-1))); do
    serf agent -node "n$i" -bind "127.0.0.1:$((SERF_BIND+i))" -rpc-addr "127.0.0.1:$((SERF_RPC+i))" -profile lan \
      -tag "blxbench=$$" -log-level warn >"$work/serf-n$i.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 0 $((n-1))); do until serf members -rpc-addr "127.0.0.1:$((SERF_RPC+i))" >/dev/null 2>&1; do sleep 0.05; done; done
  for i in $(seq 1 $((n-2))); do serf join -rpc-addr "127.0.0.1:$((SERF_RPC+i))" "127.0.0.1:$SERF_BIND" >/dev/null; done
  for i in $(seq 0 $((n-2))); do until [ "$(serf_count "$i" alive)" -eq $((n-1)) ]; do sleep 0.02; done; done
  t0=$(now)
  serf join -rpc-addr "127.0.0.1:$((SERF_RPC+n-1))" "127.0.0.1:$SERF_BIND" >/dev/null
  for i in $(seq 0 $((n-1))); do until [ "$(serf_count "$i" alive)" -eq "$n" ]; do sleep 0.02; done; done
  conv=$(elapsed "$t0")
  read -r udp tcp < <(count_bytes "$SERF_BIND" $((SERF_BIND+n-1)) "$WINDOW")
  bytes=$((udp + tcp))
  local last=$((n-1)); kill -9 "${pids[$last]}"; t0=$(now)
  for i in $(seq 0 $((n-2))); do
    until serf members -rpc-addr "127.0.0.1:$((SERF_RPC+i))" -status failed 2>/dev/null | grep -q "^n$last "; do sleep 0.02; done
  done
  echo "$conv $((bytes / n / WINDOW)) $(elapsed "$t0") $((udp / n / WINDOW)) $((tcp / n / WINDOW))"
  kill_all
}

# ---- soak: blx under loss ---------------------------------------------------------------------
if [ "${1:-}" = "--soak" ]; then
  secs=${2:?seconds}; loss=${3:?loss percent}; n=10
  blx_cluster "$n"; echo "converge_s $CONV"
  nft add table inet "$tbl"
  nft add chain inet "$tbl" out '{ type filter hook output priority 0; policy accept; }'
  nft add rule inet "$tbl" out udp dport "$BLX_GOSSIP-$((BLX_GOSSIP+n-1))" numgen random mod 100 '<' "$loss" counter drop
  nft add rule inet "$tbl" out udp dport "$BLX_GOSSIP-$((BLX_GOSSIP+n-1))" counter
  start=$(now); sleep "$secs"
  dropped=$(nft list table inet "$tbl" | sed -n 's/.*counter packets \([0-9]*\).*drop.*/\1/p')
  passed=$(nft list table inet "$tbl" | grep -v drop | sed -n 's/.*counter packets \([0-9]*\).*/\1/p')
  downs=$(cat "$work"/blx/n*.log | grep -c 'event=Down' || true)
  suspects=$(cat "$work"/blx/n*.log | grep -c 'event=Suspect' || true)
  alive_now=$(blx_count 0 alive)
  echo "soak: ${secs}s, ${loss}% loss on gossip packets ($dropped dropped of $((dropped + passed)))"
  echo "false_down_events $downs"
  echo "suspect_events $suspects (refuted in time)"
  echo "alive_at_end $alive_now of $n"
  [ "$downs" -eq 0 ]
  exit
fi

n=${1:-10}; runs=${2:-3}
command -v serf >/dev/null || { echo "serf not installed: scripts/setup.sh bench" >&2; exit 2; }
echo "membership benchmark: $n members on 127.0.0.1, $runs runs each, $(nproc) cores"
printf '%-5s %-4s %12s %18s %10s %10s %8s\n' system run converge_s bytes_per_agent_s detect_s gossip_s rest_s
declare -a bc bb bd bg sc sb sd sg
for r in $(seq 1 "$runs"); do
  read -r c b d g rest < <(blx_run "$n"); bc+=("$c"); bb+=("$b"); bd+=("$d"); bg+=("$g")
  printf '%-5s %-4s %12.3f %18d %10.3f %10d %8d\n' blx "$r" "$c" "$b" "$d" "$g" "$rest"
  read -r c b d g rest < <(serf_run "$n"); sc+=("$c"); sb+=("$b"); sd+=("$d"); sg+=("$g")
  printf '%-5s %-4s %12.3f %18d %10.3f %10d %8d\n' serf "$r" "$c" "$b" "$d" "$g" "$rest"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "| $n members, median of $runs | converge (s) | bytes/s per agent | of it gossip | detect (s) |"
echo "|---|---|---|---|---|"
printf '| blx  | %.3f | %d | %d | %.3f |\n' "$(median "${bc[@]}")" "$(median "${bb[@]}")" "$(median "${bg[@]}")" "$(median "${bd[@]}")"
printf '| serf | %.3f | %d | %d | %.3f |\n' "$(median "${sc[@]}")" "$(median "${sb[@]}")" "$(median "${sg[@]}")" "$(median "${sd[@]}")"
