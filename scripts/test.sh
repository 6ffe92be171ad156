#!/usr/bin/env bash
# The whole test suite, once per I/O driver (io_uring, then epoll).
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --all-targets --locked 2>/dev/null || cargo build --all-targets
for driver in io_uring epoll; do
  echo "=== test suite on the ${driver} driver ==="
  GATEWAY_TEST_IO_DRIVER="$driver" cargo test --all-targets "$@"
done
