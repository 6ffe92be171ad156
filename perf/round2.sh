#!/usr/bin/env bash
# Issue 17 in one run: every performance target's benchmark, one after the
# other on the same build and the same machine, each beside HAProxy's or
# nginx's figure, collected in one directory.
#
#   target 1, 2, 3  perf/compare.sh SECS, on io_uring and on epoll
#                   (CPU per message vs HAProxy, idle memory at 18,000
#                   sessions, p99.9 at half of HAProxy's peak)
#   target 1, 4     perf/floor.sh SECS 2 (the loopback floor: what receiving
#                   and sending each message costs by itself, TCP and WebSocket)
#   target 4        perf/compare-ws.sh SECS (WebSocket vs nginx)
#   target 5        perf/route-propagation.sh 1000 (needs redis-server)
#   target 6        perf/callgrind.sh, and WS=1 (needs valgrind)
#   target 7        perf/runtimes/compare.sh SECS 1 (monoio vs glommio)
#   target 8        a model (docs/SCALING.md); perf/scaling.sh is for a
#                   machine with more cores and is not run here
#
# GW_LOAD_RING=tuned: the load generator's ring set up as the gateway's
# (`gw-load --ring`), so servers' sends do not interrupt it (PERFORMANCE.md,
# "The load generator's ring").
#
# Usage: perf/round2.sh [SECONDS]   (default 10; about 35 minutes on 2 cores;
#        it takes /tmp/gw-bench.lock itself, so no other benchmark runs
#        meanwhile)
# Writes: perf/results/round2-<timestamp>/: one <step>.txt per step (its
# output) and summary.md (every step's summary, and where its full results
# are). A failed step is reported and the others still run.
# STEPS="callgrind route-propagation" runs only the named steps (names as in
# the summary); ROUND2_OUT=perf/results/round2-<timestamp> appends them to an
# earlier run's directory.
set -uo pipefail
cd "$(dirname "$0")/.."
# One benchmark at a time: hold the lock for the whole run (the steps that
# take it themselves are told it is held).
if [ -z "${ROUND2_LOCKED:-}" ]; then
  ROUND2_LOCKED=1 exec flock /tmp/gw-bench.lock "$0" "$@"
fi
SECS=${1:-10}
ALL_STEPS="compare-io_uring compare-epoll floor compare-ws route-propagation callgrind callgrind-ws runtimes"
ONLY=${STEPS:-all}
for n in $ONLY; do
  [ "$n" = all ] || [[ " $ALL_STEPS " == *" $n "* ]] || { echo "unknown step $n (steps: $ALL_STEPS)" >&2; exit 2; }
done
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins || exit 1
OUT=${ROUND2_OUT:-perf/results/round2-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUM=$OUT/summary.md
{
  if [ -n "${ROUND2_OUT:-}" ]; then
    echo; echo "# Steps added $(date -u '+%Y-%m-%d %H:%M UTC'): $ONLY"
  else
    echo "# Issue 17 in one run: $(date -u '+%Y-%m-%d %H:%M UTC')"
  fi
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg); load generator ring: ${GW_LOAD_RING:-plain}"
} >>"$SUM"

# step NAME COMMAND...: runs it, keeps its output, appends it to the summary.
step() {
  local name=$1; shift
  [ "$ONLY" = all ] || [[ " $ONLY " == *" $name "* ]] || return 0
  local t0=$SECONDS rc before log=$name
  # A step run again into the same directory keeps the first one's output.
  [ -e "$OUT/$log.txt" ] && log=$name-$(date -u +%H%M%S)
  before=$(LC_ALL=C ls perf/results)
  echo "== $name: $*" >&2
  # Each step builds what it runs: the tree it built is recorded.
  local tree
  tree=$(git describe --always --dirty 2>/dev/null || echo '?')
  "$@" >"$OUT/$log.txt" 2>&1
  rc=$?
  {
    echo
    echo "## $name"
    echo
    echo "\`$*\` (exit $rc, $((SECONDS - t0)) s, tree $tree; full output: \`$log.txt\`)"
    echo
    # The step's own summary: the summary.md of the results directory it
    # made, else the end of its output.
    local dir
    dir=$(LC_ALL=C comm -13 <(echo "$before") <(LC_ALL=C ls perf/results) | grep -v "^$(basename "$OUT")\$" | tail -1)
    [ -n "$dir" ] && dir=perf/results/$dir
    if [ -n "$dir" ] && [ -f "$dir/summary.md" ]; then
      echo "results: \`$dir/\`"
      echo
      cat "$dir/summary.md"
    else
      echo '```'
      tail -40 "$OUT/$log.txt"
      echo '```'
    fi
  } >>"$SUM"
}

step compare-io_uring perf/compare.sh "$SECS"
step compare-epoll env GW_IO_DRIVER=epoll perf/compare.sh "$SECS"
step floor perf/floor.sh "$SECS" 2
step compare-ws perf/compare-ws.sh "$SECS"
# step_if TOOL NAME COMMAND...: the step, or a note that TOOL is missing.
step_if() {
  local tool=$1 name=$2; shift 2
  [ "$ONLY" = all ] || [[ " $ONLY " == *" $name "* ]] || return 0
  if command -v "$tool" >/dev/null; then
    step "$name" "$@"
  else
    echo -e "\n## $name\n\nskipped: $tool not installed" >>"$SUM"
  fi
}
step_if redis-server route-propagation env ROUTEPROP_LOCKED=1 perf/route-propagation.sh 1000
step_if valgrind callgrind perf/callgrind.sh
step_if valgrind callgrind-ws env WS=1 perf/callgrind.sh
step runtimes perf/runtimes/compare.sh "$SECS" 1
echo -e "\nload average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$SUM"
echo "results: $OUT (summary.md)"
