#!/usr/bin/env bash
# Live upgrade under load, with larger numbers than the test suite: the
# test `two_thousand_sessions_move_to_a_new_process_under_load_and_nobody_notices`
# (tests/upgrade.rs) on a release build, for each session count and driver.
# Each run: an old gateway (2 workers) serving N sessions (half TCP, half
# WebSocket; half on a gate backend, half on seed_tcp with one backend
# connection each) under lockstep load, a new gateway started with
# --takeover; every frame checked exactly once and in order, no backend
# connection opened or closed. Prints per run: frames checked, the median
# and longest load round (the handover's pause is inside the longest), the
# pause the new process reports (first old worker frozen -> last session
# adopted) and the time from the takeover command to the old process's exit.
# Then, per driver, the failure test (a new process that exits before it
# confirms, one that refuses the version): the load rounds around it.
#
# Usage: perf/upgrade.sh [N...]            default: 2000 5000 10000
# Environment: DRIVERS="io_uring epoll"
# N clients + N/2 seed_tcp connections must fit this process's open-file
# limit (the test process holds both ends' sockets of its own side).
set -uo pipefail
cd "$(dirname "$0")/.."
COUNTS=("$@"); [ ${#COUNTS[@]} -gt 0 ] || COUNTS=(2000 5000 10000)
DRIVERS=${DRIVERS:-io_uring epoll}
OUT=perf/results/upgrade-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
echo "# live upgrade: $(git rev-parse --short HEAD) $(uname -r) $(nproc) CPUs" | tee "$OUT/summary.txt"
for drv in $DRIVERS; do
  for n in "${COUNTS[@]}"; do
    echo "== $n sessions, $drv" | tee -a "$OUT/summary.txt"
    GATEWAY_TEST_IO_DRIVER=$drv UPGRADE_SESSIONS=$n \
      cargo test --release --test upgrade two_thousand -- --nocapture >"$OUT/run-$drv-$n.log" 2>&1
    rc=$?
    grep -h "^handover of" "$OUT/run-$drv-$n.log" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || { echo "FAILED (rc $rc): $OUT/run-$drv-$n.log" | tee -a "$OUT/summary.txt"; }
  done
  # A new process that exits before confirming, and one that refuses the
  # version: the old one resumes; the pause the attempt cost its sessions.
  echo "== failed takeovers, $drv" | tee -a "$OUT/summary.txt"
  GATEWAY_TEST_IO_DRIVER=$drv cargo test --release --test upgrade fails -- --nocapture >"$OUT/fail-$drv.log" 2>&1 \
    || echo "FAILED: $OUT/fail-$drv.log" | tee -a "$OUT/summary.txt"
  grep -h "^failed takeover" "$OUT/fail-$drv.log" | tee -a "$OUT/summary.txt"
done
echo "results: $OUT"
