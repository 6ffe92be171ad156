#!/usr/bin/env bash
# Fuzzes the gateway's parsers and its shard state machine (docs/TESTING.md).
#
# Usage:
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target for SECONDS (default 60), one at a time
#   scripts/fuzz.sh --ci [TARGET...]        each target briefly (FUZZ_CI_SECONDS, default 10)
#   scripts/fuzz.sh --replay                the seed corpora on stable only (cargo test)
#
# Targets: client_frame backend_frame front_door route_json config shard.
# Needs a nightly toolchain and cargo-fuzz; installs them when missing
# (rustup, cargo install). Where that cannot be done, it says so and replays
# the committed seed corpora through the same target bodies on stable
# (`cargo test --features fuzzing --lib fuzzing`) instead.
#
# Prints executions and exec/s per target and every crash (its input is
# saved under fuzz/artifacts/TARGET/); exits non-zero on a crash.
# New corpus entries go to fuzz/corpus-live/TARGET (not committed); the
# seeds in fuzz/corpus/TARGET are read, never written.
#
# Environment: FUZZ_SANITIZER (address, the default, or none: about twice
# the executions per second, for safe Rust); FUZZ_KNOWN (checks to skip
# while a reported finding is open, see src/fuzzing.rs); FUZZ_ARGS (more
# libFuzzer flags).
set -uo pipefail
cd "$(dirname "$0")/.."

ALL=(client_frame backend_frame front_door route_json config shard)
mode=run
secs=60
case "${1:-}" in
  --ci) mode=ci; secs=${FUZZ_CI_SECONDS:-10}; shift ;;
  --replay) mode=replay; shift ;;
  -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
  '' ) ;;
  *) if [[ "$1" =~ ^[0-9]+$ ]]; then secs=$1; shift; fi ;;
esac
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (one of: ${ALL[*]})" >&2; exit 2; }
done

replay() {
  echo "fuzz.sh: $1: replaying the seed corpora (fuzz/corpus/*) and random inputs on stable"
  cargo test --features fuzzing --lib fuzzing -- --nocapture
}

[ "$mode" = replay ] && { replay "replay only"; exit $?; }

tools() {
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing the nightly toolchain (rustup toolchain install nightly --profile minimal)"
    rustup toolchain install nightly --profile minimal || return 1
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked || return 1
  fi
}

if ! tools; then
  replay "no nightly toolchain or cargo-fuzz could be had"
  exit $?
fi

san=${FUZZ_SANITIZER:-address}
# The address build shares cargo fuzz's own target dir; others get their own
# (a sanitizer change rebuilds every dependency).
tdir=fuzz/target
[ "$san" = address ] || tdir=fuzz/target-$san
echo "fuzz.sh: building the fuzz targets (nightly, sanitizer: $san)"
if ! cargo +nightly fuzz build -O -a -s "$san" --target-dir "$tdir"; then
  if [ "$mode" = ci ]; then
    replay "the nightly build failed"
    exit $?
  fi
  echo "fuzz.sh: build failed" >&2
  exit 1
fi
bin=$tdir/x86_64-unknown-linux-gnu/release

# No network for the targets: Endpoint::parse could resolve names (the
# targets skip such inputs; this is the belt to those braces).
isolate=()
if unshare -n true 2>/dev/null; then isolate=(unshare -n); fi

declare -A max_len=([client_frame]=4096 [backend_frame]=4096 [front_door]=4096 [route_json]=4096 [config]=4096 [shard]=2048)
summary=()
crashed=0
for t in "${targets[@]}"; do
  live=fuzz/corpus-live/$t
  art=fuzz/artifacts/$t
  mkdir -p "$live" "$art"
  log=$(mktemp)
  args=(-max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -max_len="${max_len[$t]}" -print_final_stats=1
        -artifact_prefix="$art/")
  [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
  # shellcheck disable=SC2206
  args+=(${FUZZ_ARGS:-})
  echo "=== $t: ${secs}s"
  "${isolate[@]}" "$bin/$t" "${args[@]}" "$live" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec/ {print $2}' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
  units=$(find "$live" -type f | wc -l)
  if [ $rc -ne 0 ] || grep -qE '^==[0-9]+==ERROR|panicked at|SUMMARY: libFuzzer' "$log"; then
    crashed=1
    input=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | sed 's/Test unit written to //')
    summary+=("$(printf '%-14s CRASH  execs=%-10s exec/s=%-7s input=%s' "$t" "${execs:-?}" "${rate:-?}" "${input:-?}")")
    echo "--- $t crashed (exit $rc); input: ${input:-?}"
    grep -m1 -A24 -E 'panicked at|^==[0-9]+==ERROR' "$log"
    echo "--- reproduce: $bin/$t ${input:-INPUT}   (or FUZZ_TRACE=1 for the shard's events)"
  else
    summary+=("$(printf '%-14s ok     execs=%-10s exec/s=%-7s cov=%-6s corpus=%s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$units")")
  fi
  rm -f "$log"
done

echo "=== fuzz.sh summary (${secs}s per target, sanitizer $san)"
printf '%s\n' "${summary[@]}"
exit $crashed
