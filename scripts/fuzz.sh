#!/usr/bin/env bash
# Runs every fuzz target (one per decoder of bytes from the network or the operator) under
# libFuzzer for SECONDS each (default 60). Installs cargo-fuzz if missing. cargo-fuzz wants a
# nightly compiler; RUSTC_BOOTSTRAP lets the stable one accept the sanitizer flags.
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${secs}s"
  cargo fuzz run "$target" -- -max_total_time="$secs" -max_len=4096 2>&1 | grep -E "^(#[0-9]+ *DONE|Done|==[0-9]+==|SUMMARY|thread)" || true
  [ -z "$(ls fuzz/artifacts/"$target" 2>/dev/null)" ] || { echo "crash found: fuzz/artifacts/$target" >&2; exit 1; }
done
