#!/usr/bin/env bash
# Checks everything under deploy/ (and the image files): exits non-zero on any
# failure; meant for CI. As root it installs what it lacks (apt: prometheus
# for promtool, systemd, kubectl, shellcheck; pip through scripts/pip-install.sh:
# kubernetes-validate, PyYAML, jsonschema).
#
# Usage: scripts/check-deploy.sh [--regen] [--no-e2e] [--bin-dir DIR] [--k8s-version X.Y.Z]
#   --regen        first rewrite the generated files: the PrometheusRule (from
#                  deploy/prometheus/alerts.yml) and the Grafana dashboard JSON
#   --no-e2e       skip scripts/test-prometheus.sh (live gateway + Prometheus)
#   --bin-dir DIR  game-gateway and mock-backend from DIR (or $GATEWAY_BIN_DIR);
#                  default: cargo build --release (CARGO_TARGET_DIR honoured)
#   --k8s-version  Kubernetes version the manifests are validated against (1.30.0)
#
# What it checks (each a line in the summary):
#   shell           shellcheck -S warning of the deploy scripts
#   alerts          promtool check rules + promtool test rules; every alert has a
#                   firing and a quiet test case; promtool check config of the
#                   bare-metal prometheus.yml
#   generated       PrometheusRule == alerts.yml; dashboard JSON == its generator
#   render:O        kubectl kustomize of overlay O
#   schema:O        kubernetes-validate --strict of every core object of O;
#                   custom resources (ServiceMonitor, PrometheusRule: no schema
#                   there) against a strict subset of monitoring.coreos.com/v1,
#                   and the rendered PrometheusRule through promtool
#   rules:O         the deployment's rules for the gateway workload (StatefulSet, or
#                   DaemonSet in host-network-live-upgrade): Guaranteed QoS with
#                   whole cores, probes, grace > drain, admin binding, token Secret
#                   mount, Job -> Redis, same image as the Job, PDB, ServiceMonitor
#                   target, overlay specifics (live upgrade: surge strategy, no
#                   hostPort/anti-affinity, shared hostPath socket directory made
#                   writable, --takeover-or-start = upgrade_socket, after_handover
#                   = wait, no drift from base and host-network)
#   config:*        the gateway binary's --check-config on every shipped config,
#                   whole ([admin] token_file read from a stand-in token file;
#                   the same config without the file must be refused)
#   routes          `game-gateway routes check` of the Job's rules.json (in the
#                   image rootfs, with the cluster names in its /etc/hosts)
#   image           scripts/build-image.sh rootfs (and the podman image FROM
#                   scratch when podman is installed); chroot --check-config as
#                   uid 65532; the gateway started in the chroot answers
#                   /health, /ready, /metrics and drains on SIGTERM
#   systemd         systemd-analyze verify (a copy whose paths point at the built
#                   binary; any warning fails), unit-vs-config rules (with
#                   upgrade_socket: Type=notify, NotifyAccess=all, ExitType=cgroup,
#                   the socket in the RuntimeDirectory), exposure score
#   tune-host       check mode changes nothing on this host; --apply/--persist/
#                   --strict on a fake /proc and /sys tree
#   e2e             scripts/test-prometheus.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=(python3 "$ROOT/deploy/tools/deploycheck.py")

regen=0 e2e=1 bin_dir=${GATEWAY_BIN_DIR:-} k8s_version=1.30.0
while [ $# -gt 0 ]; do
  case "$1" in
    --regen) regen=1; shift ;;
    --no-e2e) e2e=0; shift ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --k8s-version) k8s_version=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-deploy.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d /tmp/check-deploy.XXXXXX)
GW_PID=""
cleanup() {
  [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

results=()
failed=0
record() { # name status detail
  results+=("$1"$'\t'"$2"$'\t'"$3")
  [ "$2" = FAIL ] && failed=$((failed + 1))
  printf '==> %-22s %s %s\n' "$1" "$2" "$3"
}
section() { printf '\n### %s\n' "$*"; }

# --- tools -------------------------------------------------------------------------
section "tools"
apt_need=()
command -v promtool >/dev/null 2>&1 || apt_need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || apt_need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || apt_need+=(systemd)
command -v kubectl >/dev/null 2>&1 || apt_need+=(kubectl)
command -v shellcheck >/dev/null 2>&1 || apt_need+=(shellcheck)
command -v curl >/dev/null 2>&1 || apt_need+=(curl)
command -v column >/dev/null 2>&1 || apt_need+=(bsdextrautils)
command -v python3 >/dev/null 2>&1 || apt_need+=(python3 python3-pip)
if [ ${#apt_need[@]} -gt 0 ]; then
  mapfile -t apt_need < <(printf '%s\n' "${apt_need[@]}" | sort -u)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Only what the configured repositories have (Debian itself has no
    # kubectl: it needs the Kubernetes apt repository), so that one missing
    # package does not stop the others from being installed.
    apt_have=()
    for p in "${apt_need[@]}"; do
      if [ -n "$(apt-cache policy "$p" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '(none)')" ]; then
        apt_have+=("$p")
      else
        echo "not in the configured apt repositories: $p" >&2
      fi
    done
    if [ ${#apt_have[@]} -gt 0 ]; then
      echo "installing (apt): ${apt_have[*]}"
      apt-get install -y -qq "${apt_have[@]}" >/dev/null
    fi
  else
    echo "missing tools (install the Debian packages): ${apt_need[*]}" >&2
  fi
fi
pip_need=()
python3 -c 'import yaml' 2>/dev/null || pip_need+=(pyyaml)
python3 -c 'import jsonschema' 2>/dev/null || pip_need+=(jsonschema)
command -v kubernetes-validate >/dev/null 2>&1 || pip_need+=(kubernetes-validate)
if [ ${#pip_need[@]} -gt 0 ]; then
  echo "installing (pip): ${pip_need[*]}"
  scripts/pip-install.sh "${pip_need[@]}" || true
  hash -r
fi
for t in promtool prometheus systemd-analyze kubectl kubernetes-validate python3 curl; do
  command -v "$t" >/dev/null 2>&1 || { record "tool:$t" FAIL "not installed"; }
done
echo "promtool: $(promtool --version 2>&1 | head -1)"
echo "kubectl: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
echo "kubernetes-validate: $(kubernetes-validate --version 2>&1)"

# --- binaries ----------------------------------------------------------------------------
section "binaries"
if [ -z "$bin_dir" ]; then
  echo "building game-gateway and mock-backend (release)"
  if cargo build --release --locked -p game-gateway -p mock-backend --bin game-gateway --bin mock-backend 2>&1 | tail -n 2; then
    bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
  fi
fi
GW="$bin_dir/game-gateway"
MOCK="$bin_dir/mock-backend"
if [ -x "$GW" ] && [ -x "$MOCK" ]; then
  echo "using $GW ($("$GW" --version))"
else
  record binaries FAIL "no game-gateway / mock-backend in ${bin_dir:-?}"
  GW="" MOCK=""
fi

if [ "$regen" = 1 ]; then
  section "regenerate"
  "${PY[@]}" gen-prometheusrule
  python3 deploy/grafana/generate-dashboard.py
fi

# --- scripts -----------------------------------------------------------------------------
section "shellcheck"
scripts=(scripts/check-deploy.sh scripts/build-image.sh scripts/tune-host.sh scripts/test-prometheus.sh
  scripts/pip-install.sh scripts/test.sh)
if command -v shellcheck >/dev/null 2>&1; then
  if shellcheck -S warning "${scripts[@]}"; then record shellcheck PASS "${#scripts[@]} scripts"
  else record shellcheck FAIL "see above"; fi
else
  record shellcheck FAIL "shellcheck not installed"
fi

# --- alerts ------------------------------------------------------------------------------
section "alerts: promtool"
if promtool check rules deploy/prometheus/alerts.yml && promtool test rules deploy/prometheus/alerts_test.yml \
  && (cd deploy/prometheus && promtool check config prometheus.yml >/dev/null) \
  && "${PY[@]}" check-alert-tests deploy/prometheus/alerts.yml deploy/prometheus/alerts_test.yml; then
  record alerts PASS "$(grep -c '^ *- alert:' deploy/prometheus/alerts.yml) alerts, promtool check + unit tests"
else
  record alerts FAIL "promtool check/test rules"
fi

section "generated files"
if "${PY[@]}" check-prometheusrule && python3 deploy/grafana/generate-dashboard.py --check; then
  record generated PASS "PrometheusRule == alerts.yml, dashboard up to date"
else
  record generated FAIL "run scripts/check-deploy.sh --regen"
fi

# --- Kubernetes ------------------------------------------------------------------------------
overlays=(host-network pod-network host-network-live-upgrade)
for overlay in "${overlays[@]}"; do
  section "kubernetes: $overlay"
  out="$WORK/$overlay"
  mkdir -p "$out"
  if ! kubectl kustomize "deploy/kubernetes/overlays/$overlay" > "$out/rendered.yaml"; then
    record "render:$overlay" FAIL "kubectl kustomize"
    continue
  fi
  record "render:$overlay" PASS "$(grep -c '^kind:' "$out/rendered.yaml") objects"
  "${PY[@]}" split "$out/rendered.yaml" "$out/split"
  schema_ok=1
  kubernetes-validate --strict -k "$k8s_version" --quiet "$out/split/core.yaml" || schema_ok=0
  crds=("$out"/split/crd-*.yaml)
  if [ -e "${crds[0]}" ]; then
    "${PY[@]}" check-crds "${crds[@]}" || schema_ok=0
  fi
  if [ -f "$out/split/prometheusrule-rules.yml" ]; then
    promtool check rules "$out/split/prometheusrule-rules.yml" >/dev/null || schema_ok=0
    "${PY[@]}" check-prometheusrule "$out/rendered.yaml" || schema_ok=0
  fi
  if [ "$schema_ok" = 1 ]; then
    record "schema:$overlay" PASS "core kinds strict against Kubernetes $k8s_version; CRDs against their schema subset"
  else
    record "schema:$overlay" FAIL "see above"
  fi
  if "${PY[@]}" check-rendered "$out/rendered.yaml" "$overlay"; then
    record "rules:$overlay" PASS "QoS, probes, grace, token, Job, PDB, ServiceMonitor, $overlay specifics"
  else
    record "rules:$overlay" FAIL "see above"
  fi
  "${PY[@]}" extract "$out/rendered.yaml" ConfigMap game-gateway-config gateway.toml > "$WORK/k8s-$overlay.toml"
  "${PY[@]}" extract "$out/rendered.yaml" Secret game-gateway-admin-token token > "$WORK/k8s-$overlay.token" 2>/dev/null
done

# --- configs through the binary ------------------------------------------------------------
# Every shipped config goes through the binary whole, [admin] included. Its
# token_file names a path on the target host, so the binary reads a stand-in
# at a scratch path instead (the rendered Secret's token for Kubernetes, a
# generated one elsewhere; every other line unchanged); where that path comes
# from is checked by rules:O (the Secret mount) and systemd. The same config
# with its token file missing must be refused, naming admin.token_file.
check_config() { # label file [token]
  local label=$1 file=$2 token=${3:-} out rc token_file checked=$2 note=""
  token_file=$("${PY[@]}" toml-get "$file" admin.token_file)
  if [ -n "$token_file" ]; then
    [ -n "$token" ] || token=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s' "$token" > "$WORK/token-$label"
    "${PY[@]}" set-token-file "$file" "$WORK/token-$label" > "$WORK/config-$label.toml"
    "${PY[@]}" set-token-file "$file" "$WORK/missing-token-$label" > "$WORK/config-$label-no-token.toml"
    checked="$WORK/config-$label.toml"
    note="; [admin] token_file $token_file checked with a stand-in token"
    out=$(POD_NAME=game-gateway-1 "$GW" --check-config --config "$WORK/config-$label-no-token.toml" 2>&1)
    if ! grep -q "admin.token_file: $WORK/missing-token-$label: cannot read" <<< "$out"; then
      echo "$out"
      record "config:$label" FAIL "a missing admin token file was not refused"
      return
    fi
  fi
  out=$(POD_NAME=game-gateway-1 "$GW" --check-config --config "$checked" 2>&1)
  rc=$?
  if [ $rc = 0 ]; then
    record "config:$label" PASS "$(grep -c '' <<< "$out") lines, config ok$note"
  else
    echo "$out"
    record "config:$label" FAIL "invalid"
  fi
}
if [ -n "$GW" ]; then
  section "configs"
  check_config default config/gateway.toml
  check_config systemd deploy/systemd/gateway.toml
  for overlay in "${overlays[@]}"; do
    [ -s "$WORK/k8s-$overlay.toml" ] \
      && check_config "k8s-$overlay" "$WORK/k8s-$overlay.toml" "$(cat "$WORK/k8s-$overlay.token" 2>/dev/null)"
  done
fi

# --- image ------------------------------------------------------------------------------------
if [ -n "$GW" ]; then
  section "image rootfs"
  img="$WORK/image"
  # With podman installed, the FROM-scratch image is built too (then removed).
  podman_note="no podman: rootfs only"
  command -v podman >/dev/null 2>&1 && podman_note="podman image built FROM scratch"
  if scripts/build-image.sh --binary "$GW" --out "$img" --tag localhost/game-gateway:check-deploy \
       > "$WORK/image.log" 2>&1; then
    command -v podman >/dev/null 2>&1 && podman rmi -f localhost/game-gateway:check-deploy >/dev/null 2>&1
    rootfs="$img/rootfs"
    sed 's/^/   /' "$WORK/image.log"
    image_ok=1
    if [ "$(id -u)" != 0 ]; then
      record image FAIL "chroot needs root"
      image_ok=0
    else
      chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/game-gateway --check-config \
        --config /etc/game-gateway/gateway.toml | tail -n 1 || image_ok=0
      # The gateway itself, in the image's filesystem, on loopback ports.
      cat > "$rootfs/tmp/run.toml" <<'EOF'
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 1
drain_timeout = "1s"
[log]
level = "warn"
format = "text"
access_log = false
[[routes]]
server_type = 10
strategy = "round_robin"
endpoints = ["127.0.0.1:19711"]
EOF
      chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/game-gateway --config /tmp/run.toml \
        > "$WORK/chroot-gw.out" 2> "$WORK/chroot-gw.err" &
      GW_PID=$!
      admin=""
      for _ in $(seq 1 50); do
        admin=$(sed -n 's/.* admin \([0-9.:]*\) .*/\1/p' "$WORK/chroot-gw.out")
        [ -n "$admin" ] && break
        sleep 0.1
      done
      if [ -z "$admin" ]; then
        echo "gateway in the chroot did not start:"; cat "$WORK/chroot-gw.err"
        image_ok=0
      else
        echo "   gateway in the chroot: $(head -1 "$WORK/chroot-gw.out")"
        for path in /health /ready; do
          code=$(curl -s -o /dev/null -w '%{http_code}' "http://$admin$path")
          echo "   GET $path -> $code"
          [ "$code" = 200 ] || image_ok=0
        done
        n=$(curl -s "http://$admin/metrics" | grep -c '^game_gateway_')
        echo "   GET /metrics -> $n game_gateway_ samples"
        [ "$n" -gt 10 ] || image_ok=0
        kill -TERM "$GW_PID"
        rc=0
        for _ in $(seq 1 100); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
        wait "$GW_PID" || rc=$?
        GW_PID=""
        echo "   SIGTERM -> exit $rc"
        [ "$rc" = 0 ] || image_ok=0
      fi
      # The Job's rules file, checked by the image's binary with the cluster
      # Service names pointed at loopback (they only resolve in the cluster).
      section "routes: the Job's rules.json"
      rules=deploy/kubernetes/base/rules.json
      cp "$rules" "$rootfs/tmp/rules.json"
      for h in $("${PY[@]}" rules-hosts "$rules"); do printf '127.0.0.1\t%s\n' "$h" >> "$rootfs/etc/hosts"; done
      if chroot --userspec=65532:65532 "$rootfs" /usr/local/bin/game-gateway routes check /tmp/rules.json; then
        record routes PASS "rules.json valid ($(grep -c svc.cluster.local "$rootfs/etc/hosts") cluster names mapped in the rootfs /etc/hosts)"
      else
        record routes FAIL "game-gateway routes check"
      fi
    fi
    if [ "$image_ok" = 1 ]; then
      record image PASS "$(du -sh "$rootfs" | cut -f1) rootfs, $(find "$rootfs" -name '*.so*' | wc -l) libraries; chroot check-config, serve, drain; $podman_note"
    else
      record image FAIL "see above"
    fi
  else
    cat "$WORK/image.log"
    record image FAIL "scripts/build-image.sh"
  fi
fi

# --- systemd -----------------------------------------------------------------------------------
section "systemd"
unit=deploy/systemd/game-gateway.service
sd_ok=1
if [ -n "$GW" ]; then
  # The real unit, with its binary path pointed at the built binary so that
  # verify can check the executables; everything else is unchanged.
  mkdir -p "$WORK/systemd"
  sed "s|/usr/local/bin/game-gateway|$GW|g" "$unit" > "$WORK/systemd/game-gateway.service"
  if (cd "$WORK/systemd" && systemd-analyze verify ./game-gateway.service) > "$WORK/verify.log" 2>&1 \
     && [ ! -s "$WORK/verify.log" ]; then
    echo "systemd-analyze verify: clean"
  else
    cat "$WORK/verify.log"
    sd_ok=0
  fi
  exposure=$(systemd-analyze security --offline=yes "$WORK/systemd/game-gateway.service" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
  echo "systemd-analyze security: exposure ${exposure:-?}"
  if [ -z "$exposure" ] || ! awk -v e="$exposure" 'BEGIN { exit !(e <= 3.0) }'; then
    echo "exposure ${exposure:-unknown} is above 3.0"
    sd_ok=0
  fi
else
  sd_ok=0
fi
"${PY[@]}" check-unit "$unit" deploy/systemd/gateway.toml || sd_ok=0
if [ "$sd_ok" = 1 ]; then record systemd PASS "verify clean, exposure $exposure, stop timeout > drain, live-upgrade settings"
else record systemd FAIL "see above"; fi

# --- tune-host ---------------------------------------------------------------------------------
section "tune-host"
th_ok=1
snap() { for k in net/core/somaxconn net/ipv4/tcp_fin_timeout fs/nr_open net/ipv4/ip_local_port_range; do
  cat "/proc/sys/$k" 2>/dev/null; done; }
before=$(snap)
scripts/tune-host.sh --worker-cpus 0 > "$WORK/tune.log" 2>&1 || { cat "$WORK/tune.log"; th_ok=0; }
[ "$(snap)" = "$before" ] || { echo "check mode changed sysctls"; th_ok=0; }
tail -n 3 "$WORK/tune.log"
# A fake host: 4 CPUs, a NIC with two interrupts on every CPU, default sysctls.
fake="$WORK/fakehost"
mkdir -p "$fake/sys/devices/system/cpu" "$fake/sys/class/net/eth9/device/msi_irqs/40" \
  "$fake/sys/class/net/eth9/device/msi_irqs/41" "$fake/proc/irq/40" "$fake/proc/irq/41" "$fake/etc/default"
echo 0-3 > "$fake/sys/devices/system/cpu/online"
for c in 0 1 2 3; do mkdir -p "$fake/sys/devices/system/cpu/cpu$c/cpufreq"
  echo powersave > "$fake/sys/devices/system/cpu/cpu$c/cpufreq/scaling_governor"; done
echo 0-3 > "$fake/proc/irq/40/smp_affinity_list"; echo 2 > "$fake/proc/irq/41/smp_affinity_list"
while read -r k v; do mkdir -p "$(dirname "$fake/proc/sys/$k")"; echo "$v" > "$fake/proc/sys/$k"; done <<'EOF'
net/core/somaxconn 4096
net/ipv4/tcp_max_syn_backlog 512
net/core/netdev_max_backlog 1000
net/ipv4/ip_local_port_range 32768	60999
net/ipv4/tcp_fin_timeout 60
net/ipv4/tcp_tw_reuse 2
net/ipv4/tcp_syncookies 1
net/core/rmem_max 212992
net/core/wmem_max 212992
net/ipv4/tcp_rmem 4096	131072	6291456
net/ipv4/tcp_wmem 4096	16384	4194304
fs/file-max 9223372036854775807
fs/nr_open 1048576
EOF
TUNE_HOST_ROOT=$fake scripts/tune-host.sh --worker-cpus 0-2 --strict > "$WORK/fake1.log" 2>&1 && th_ok=0
grep -q '^irq 41 (eth9) affinity .*DIFF' "$WORK/fake1.log" || { echo "fake host: IRQ 41 on a worker CPU not reported"; th_ok=0; }
[ "$(cat "$fake/proc/sys/net/core/somaxconn")" = 4096 ] || { echo "fake host: check mode wrote a sysctl"; th_ok=0; }
TUNE_HOST_ROOT=$fake scripts/tune-host.sh --worker-cpus 0-2 --apply --persist > "$WORK/fake2.log" 2>&1 \
  || { cat "$WORK/fake2.log"; th_ok=0; }
[ "$(cat "$fake/proc/sys/net/core/somaxconn")" = 65535 ] || { echo "fake host: --apply did not set somaxconn"; th_ok=0; }
[ "$(cat "$fake/proc/irq/40/smp_affinity_list")" = 3 ] || { echo "fake host: IRQ 40 not moved to CPU 3"; th_ok=0; }
grep -q 'net.core.somaxconn = 65535' "$fake/etc/sysctl.d/90-game-gateway.conf" 2>/dev/null \
  || { echo "fake host: --persist wrote no sysctl.d file"; th_ok=0; }
[ "$(cat "$fake/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor")" = performance ] || th_ok=0
[ "$(cat "$fake/sys/devices/system/cpu/cpu3/cpufreq/scaling_governor")" = powersave ] || th_ok=0
TUNE_HOST_ROOT=$fake scripts/tune-host.sh --worker-cpus 0-2 --strict > "$WORK/fake3.log" 2>&1 \
  || { echo "fake host: still differs after --apply:"; cat "$WORK/fake3.log"; th_ok=0; }
if [ "$th_ok" = 1 ]; then
  record tune-host PASS "check mode changes nothing; fake host: $(grep -c 'APPLIED' "$WORK/fake2.log") settings applied, then --strict clean"
else
  record tune-host FAIL "see above"
fi

# --- end to end ------------------------------------------------------------------------------
if [ "$e2e" = 1 ]; then
  section "end to end: scripts/test-prometheus.sh"
  if [ -n "$GW" ] && scripts/test-prometheus.sh --bin-dir "$bin_dir"; then
    record e2e PASS "Prometheus scraped a live gateway; the induced alerts fired"
  else
    record e2e FAIL "scripts/test-prometheus.sh"
  fi
fi

section "summary"
{ printf 'CHECK\tRESULT\tDETAIL\n'; printf '%s\n' "${results[@]}"; } | column -t -s $'\t'
total=${#results[@]}
echo "check-deploy: $((total - failed)) passed, $failed failed"
[ "$failed" = 0 ]
