#!/usr/bin/env bash
# The whole test suite, once per I/O driver (io_uring, then epoll).
# Usage: scripts/test.sh [extra cargo test args]
#
# The tests start their own redis-server (on a free loopback port) and drive
# headless Chromium; when either is missing and this runs as root with
# apt-get, the Debian packages are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ] || need+=(chromium)
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

cargo build --workspace --all-targets --locked 2>/dev/null || cargo build --workspace --all-targets
for driver in io_uring epoll; do
  echo "=== test suite on the ${driver} driver ==="
  GATEWAY_TEST_IO_DRIVER="$driver" cargo test --workspace --all-targets "$@"
done
