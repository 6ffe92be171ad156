#!/usr/bin/env bash
# Installs Python packages for the test and check scripts, with the python3
# on PATH (or $PYTHON):
#   scripts/pip-install.sh PKG...      e.g. pyyaml jsonschema
#   scripts/pip-install.sh -r FILE     a requirements file
# When that Python has no pip and this runs as root with apt-get, Debian's
# python3-pip is installed first. On a distribution Python that refuses pip
# (PEP 668, Debian 12+ / Ubuntu 23.04+: "externally-managed-environment") the
# install is retried with --break-system-packages (as root the packages go
# to /usr/local, not over Debian's own). Exit status: pip's.
set -uo pipefail
if [ $# = 0 ]; then
  echo "usage: scripts/pip-install.sh PKG... | -r REQUIREMENTS" >&2
  exit 2
fi
py=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if ! "$py" -m pip --version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing (apt): python3-pip"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq python3-pip >/dev/null
  fi
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "pip-install.sh: $py has no pip (install python3-pip)" >&2
    exit 1
  fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if "$py" -m pip install -q "$@" > "$log" 2>&1; then
  grep -iv '^warning' "$log" || true
  exit 0
fi
if grep -q 'externally-managed-environment' "$log"; then
  echo "pip: $py is externally managed (PEP 668); installing with --break-system-packages"
  "$py" -m pip install -q --break-system-packages "$@"
  exit $?
fi
cat "$log" >&2
exit 1
