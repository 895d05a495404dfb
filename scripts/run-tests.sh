#!/usr/bin/env bash
# Runs the whole test suite and ends with one line totalling every test binary's results
# (cargo prints a result per binary, the last often a doc-test run with nothing in it).
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Two test threads per binary: each integration test runs a cluster of debug agents, and
# more of them at once than there are cores starves Raft's timers.
# First the simulator's own test, with its deliberate bug switched on (a feature no other
# build enables); then everything else, which also rebuilds the simulator without it.
cargo test -p blx-simulation --features unsafe-early-ack --test early_ack 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
