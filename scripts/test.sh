#!/usr/bin/env bash
# The whole test suite, in stages:
#   1. cargo tests (unit, property, end to end over real sockets), once per
#      I/O driver (io_uring, then epoll);
#   2. scripts/check-deploy.sh --no-e2e: everything under deploy/;
#   3. scripts/test-prometheus.sh: a real Prometheus scrapes a live gateway;
#   4. scripts/fuzz.sh --replay: the fuzz seed corpora through the fuzz
#      target bodies on stable (keeps the fuzz harness building and true).
# Every stage runs even when an earlier one failed; the summary lists each,
# and the exit status is 1 when any failed. Each stage is bounded by
# `timeout` (which ends the stage's whole process group).
#
# Usage: scripts/test.sh [extra cargo test args]    e.g. --no-fail-fast
# Environment:
#   TEST_SKIP_DEPLOY=1         skip stages 2 and 3
#   TEST_TIMEOUT_CARGO=S       per driver (default 2400)
#   TEST_TIMEOUT_BUILD=S       release build for stages 2-3 (default 1800)
#   TEST_TIMEOUT_DEPLOY=S      check-deploy.sh (default 1200)
#   TEST_TIMEOUT_PROMETHEUS=S  test-prometheus.sh (default 600)
#
# The tests start their own redis-server (on a free loopback port) and drive
# headless Chromium; when either is missing and this runs as root with
# apt-get, the Debian packages are installed first, and so are the Python
# packages of tests/backends/requirements.txt (scripts/pip-install.sh).
# check-deploy.sh and test-prometheus.sh install their own tools.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ] || need+=(chromium)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v timeout >/dev/null 2>&1 || need+=(coreutils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (install the Debian packages; the tests that need them will fail)" >&2
  fi
fi
if [ -f tests/backends/requirements.txt ]; then
  echo "python packages: tests/backends/requirements.txt"
  scripts/pip-install.sh -r tests/backends/requirements.txt \
    || echo "could not install tests/backends/requirements.txt; the tests that need it will fail" >&2
fi

results=()
failed=0
stage_pid=""
# Ctrl-C / SIGTERM end the running stage too (timeout runs it in its own
# process group, which the terminal's Ctrl-C does not reach).
trap 'echo "interrupted" >&2; [ -n "$stage_pid" ] && kill -TERM "$stage_pid" 2>/dev/null; wait; exit 130' INT TERM
stage() { # name timeout-seconds command...
  local name=$1 limit=$2 start rc took
  shift 2
  echo "=== ${name} ==="
  start=$(date +%s)
  timeout -k 30 "$limit" "$@" &
  stage_pid=$!
  wait "$stage_pid"
  rc=$?
  stage_pid=""
  took=$(($(date +%s) - start))
  if [ $rc = 0 ]; then
    results+=("PASS  ${name} (${took}s)")
  else
    [ $rc = 124 ] && echo "${name}: timed out after ${limit}s" >&2
    results+=("FAIL  ${name} (exit ${rc}, ${took}s)")
    failed=$((failed + 1))
  fi
  return $rc
}

if stage "build (debug, all targets)" "${TEST_TIMEOUT_BUILD:-1800}" bash -c \
  'cargo build --workspace --all-targets --locked 2>/dev/null || cargo build --workspace --all-targets'; then
  for driver in io_uring epoll; do
    stage "cargo test on the ${driver} driver" "${TEST_TIMEOUT_CARGO:-2400}" \
      env GATEWAY_TEST_IO_DRIVER="$driver" cargo test --workspace --all-targets "$@"
  done
  stage "scripts/fuzz.sh --replay" "${TEST_TIMEOUT_BUILD:-1800}" scripts/fuzz.sh --replay
fi

if [ "${TEST_SKIP_DEPLOY:-0}" != 1 ]; then
  # One release build for both deploy stages.
  bin_dir="${CARGO_TARGET_DIR:-$PWD/target}/release"
  if stage "build (release: game-gateway, mock-backend)" "${TEST_TIMEOUT_BUILD:-1800}" \
    cargo build --release --locked -p game-gateway -p mock-backend --bin game-gateway --bin mock-backend; then
    stage "scripts/check-deploy.sh --no-e2e" "${TEST_TIMEOUT_DEPLOY:-1200}" \
      scripts/check-deploy.sh --no-e2e --bin-dir "$bin_dir"
    stage "scripts/test-prometheus.sh" "${TEST_TIMEOUT_PROMETHEUS:-600}" \
      scripts/test-prometheus.sh --bin-dir "$bin_dir"
  fi
fi

echo
echo "=== summary ==="
printf '%s\n' "${results[@]}"
[ "$failed" = 0 ]
