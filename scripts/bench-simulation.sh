#!/usr/bin/env bash
# Simulator speed: 5 real agents for SECS of virtual time with faults, per seed, in wall time.
#
#   scripts/bench-simulation.sh SIM_BIN [SECS] [SEEDS]     SECS default 600, SEEDS default "1 2 3"
#
# SIM_BIN is the release `blx-simulation` (cargo build --release -p blx-simulation). Each run
# is timed by /usr/bin/time -v (wall clock and peak RSS); the run's own line (seed, trace
# hash, client operations, datagrams dropped, verdict) is printed beside it.
set -euo pipefail
sim=${1:?usage: $0 SIM_BIN [SECS] [SEEDS]}
secs=${2:-600}
seeds=${3:-"1 2 3"}
out=$(mktemp); trap 'rm -f "$out"' EXIT
printf '| seed | virtual s | wall s | virtual/wall | peak RSS MiB | ops | verdict |\n|---|---|---|---|---|---|---|\n'
for seed in $seeds; do
  /usr/bin/time -v "$sim" --seed "$seed" --secs "$secs" >"$out" 2>"$out.time" || true
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$out.time")
  rss=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$out.time")
  line=$(grep "^seed $seed " "$out")
  ops=$(sed -n 's/.* ops \([0-9]*\) .*/\1/p' <<<"$line")
  verdict=$(sed -n 's/.* wall [0-9.]*s \(.*\)/\1/p' <<<"$line")
  printf '| %s | %s | %.1f | %.0f× | %s | %s | %s |\n' "$seed" "$secs" "$wall" "$(echo "$secs / $wall" | bc -l)" "$rss" "$ops" "$verdict"
  rm -f "$out.time"
done
