#!/usr/bin/env bash
# Host tuning for game-gateway on bare metal or dedicated Kubernetes nodes.
#
# Checks, and with --apply sets: network and fd sysctls, the fd limit the
# gateway runs with, NIC interrupt affinity (away from the worker CPUs),
# irqbalance (must not move interrupts back onto the workers), and the CPU
# frequency governor of the worker CPUs. Prints one table of what differs
# from the recommendation. Without --apply it changes nothing.
#
# Usage: scripts/tune-host.sh [--worker-cpus LIST] [--iface NAME]... [--apply [--persist]] [--strict]
#   --worker-cpus LIST  CPUs the gateway workers run on, e.g. 0-5 or 2-7,10
#                       (the unit's CPUAffinity / the pod's exclusive cores).
#                       NIC interrupts go to the other online CPUs.
#                       Without it, the interrupt and governor checks are skipped.
#   --iface NAME        only this NIC (repeatable); default every NIC with a device
#   --apply             set what differs (root): sysctls now, IRQ affinity now,
#                       irqbalance banned CPUs, governor "performance"
#   --persist           with --apply, also write /etc/sysctl.d/90-game-gateway.conf
#                       (IRQ affinity does not survive a reboot: run --apply at boot)
#   --strict            exit 1 when anything differs (for CI or provisioning checks)
#
# Exit: 0 (and with --strict: nothing differs), 1 differences under --strict or
# a failed --apply, 2 usage.
set -uo pipefail

ROOT=${TUNE_HOST_ROOT:-}   # tests point this at a fake /proc and /sys tree
apply=0 persist=0 strict=0 worker_spec="" ifaces=()
while [ $# -gt 0 ]; do
  case "$1" in
    --worker-cpus) worker_spec=${2:-}; shift 2 ;;
    --worker-cpus=*) worker_spec=${1#*=}; shift ;;
    --iface) ifaces+=("${2:-}"); shift 2 ;;
    --apply) apply=1; shift ;;
    --persist) persist=1; shift ;;
    --strict) strict=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "tune-host.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$apply" = 1 ] && [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  echo "tune-host.sh: --apply needs root" >&2
  exit 2
fi

# --- CPU lists ---------------------------------------------------------------
expand_cpus() { # "0-3,6" -> "0 1 2 3 6"
  local part a b i
  local -a parts cpus=()
  IFS=, read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    [ -z "$part" ] && continue
    if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
      a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]}
      for ((i = a; i <= b; i++)); do cpus+=("$i"); done
    elif [[ "$part" =~ ^[0-9]+$ ]]; then
      cpus+=("$part")
    else
      return 1
    fi
  done
  echo "${cpus[@]}"
}
compress_cpus() { # "0 1 2 3 6" -> "0-3,6"
  local out="" start="" prev="" c
  for c in $(printf '%s\n' "$@" | sort -n | uniq); do
    if [ -z "$start" ]; then start=$c prev=$c
    elif [ "$c" -eq $((prev + 1)) ]; then prev=$c
    else
      out+="${out:+,}$start$([ "$start" != "$prev" ] && echo "-$prev")"; start=$c prev=$c
    fi
  done
  [ -n "$start" ] && out+="${out:+,}$start$([ "$start" != "$prev" ] && echo "-$prev")"
  echo "$out"
}

online_spec=$(cat "$ROOT/sys/devices/system/cpu/online" 2>/dev/null || echo "0-$(($(nproc) - 1))")
online=$(expand_cpus "$online_spec")
workers="" housekeeping=""
if [ -n "$worker_spec" ]; then
  if ! workers=$(expand_cpus "$worker_spec") || [ -z "$workers" ]; then
    echo "tune-host.sh: --worker-cpus $worker_spec is not a CPU list like 0-5 or 2,3,6-7" >&2
    exit 2
  fi
  for c in $workers; do
    if ! grep -qw "$c" <<< "$online"; then
      echo "tune-host.sh: worker CPU $c is not online (online: $online_spec)" >&2
      exit 2
    fi
  done
  for c in $online; do grep -qw "$c" <<< "$workers" || housekeeping+="$c "; done
  if [ -z "$housekeeping" ]; then
    echo "tune-host.sh: --worker-cpus $worker_spec covers every online CPU; leave at least one for interrupts and the system" >&2
    exit 2
  fi
  housekeeping_spec=$(compress_cpus $housekeeping)
fi

# --- the table -------------------------------------------------------------------
rows=() differs=0 failed=0
row() { # item current recommended status
  rows+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4")
  case "$4" in DIFF*) differs=$((differs + 1)) ;; FAILED*) failed=$((failed + 1)) ;; esac
}

# --- sysctls -----------------------------------------------------------------------
# name | recommended | how to compare: min (current >= each field), range
# (port range at least this wide), eq, max (current <= value)
SYSCTLS=(
  "net.core.somaxconn|65535|min"
  "net.ipv4.tcp_max_syn_backlog|65535|min"
  "net.core.netdev_max_backlog|65536|min"
  "net.ipv4.ip_local_port_range|10240 65535|range"
  "net.ipv4.tcp_fin_timeout|15|max"
  "net.ipv4.tcp_tw_reuse|1|eq"
  "net.ipv4.tcp_syncookies|1|eq"
  "net.core.rmem_max|16777216|min"
  "net.core.wmem_max|16777216|min"
  "net.ipv4.tcp_rmem|4096 87380 16777216|min"
  "net.ipv4.tcp_wmem|4096 65536 16777216|min"
  "fs.file-max|2097152|min"
  "fs.nr_open|2097152|min"
  "net.netfilter.nf_conntrack_max|1048576|min"
)
sysctl_ok() { # current recommended mode
  local -a have want
  read -ra have <<< "$1"
  read -ra want <<< "$2"
  [ "${#have[@]}" -eq "${#want[@]}" ] || return 1
  case "$3" in
    eq) [ "$1" = "$2" ] ;;
    max) [ "${have[0]}" -le "${want[0]}" ] ;;
    range) [ "${have[0]}" -le "${want[0]}" ] && [ "${have[1]}" -ge "${want[1]}" ] ;;
    min)
      local i
      for i in "${!want[@]}"; do [ "${have[$i]}" -ge "${want[$i]}" ] || return 1; done ;;
  esac
}
persist_lines=()
for entry in "${SYSCTLS[@]}"; do
  IFS='|' read -r name rec mode <<< "$entry"
  path="$ROOT/proc/sys/${name//.//}"
  if [ ! -r "$path" ]; then
    row "sysctl $name" "absent" "$rec" "n/a"
    continue
  fi
  cur=$(tr -s ' \t' ' ' < "$path" | sed 's/ *$//')
  if sysctl_ok "$cur" "$rec" "$mode"; then
    row "sysctl $name" "$cur" "$rec" "ok"
    continue
  fi
  persist_lines+=("$name = $rec")
  if [ "$apply" = 1 ]; then
    if printf '%s\n' "$rec" > "$path" 2>/dev/null; then
      row "sysctl $name" "$cur" "$rec" "APPLIED"
    else
      row "sysctl $name" "$cur" "$rec" "FAILED (read-only here?)"
    fi
  else
    row "sysctl $name" "$cur" "$rec" "DIFF"
  fi
done
if [ "$apply" = 1 ] && [ "$persist" = 1 ] && [ ${#persist_lines[@]} -gt 0 ]; then
  conf="$ROOT/etc/sysctl.d/90-game-gateway.conf"
  mkdir -p "$(dirname "$conf")"
  { echo "# game-gateway host tuning (scripts/tune-host.sh --apply --persist)"; printf '%s\n' "${persist_lines[@]}"; } > "$conf"
  row "file ${conf#"$ROOT"}" "-" "written" "APPLIED"
fi

# --- fd limits -------------------------------------------------------------------------
want_nofile=1048576
# This shell's limit only says what a gateway started by hand from it gets;
# the unit sets its own (LimitNOFILE), so it is information, not a difference.
row "ulimit -Hn (this shell)" "$(ulimit -Hn)" ">= $want_nofile by hand" "info"
if [ -z "$ROOT" ] && command -v systemctl >/dev/null 2>&1 \
   && unit_nofile=$(systemctl show -p LimitNOFILE --value game-gateway 2>/dev/null) && [ -n "$unit_nofile" ] \
   && systemctl cat game-gateway >/dev/null 2>&1; then
  if [ "$unit_nofile" = infinity ] || [ "$unit_nofile" -ge "$want_nofile" ]; then
    row "game-gateway.service LimitNOFILE" "$unit_nofile" ">= $want_nofile" "ok"
  else
    row "game-gateway.service LimitNOFILE" "$unit_nofile" ">= $want_nofile" "DIFF (systemctl edit game-gateway)"
  fi
fi
pids=$(pgrep -x game-gateway 2>/dev/null || true)
[ -n "$ROOT" ] && pids=""
if [ -z "$pids" ]; then
  row "running game-gateway nofile" "not running" ">= $want_nofile" "n/a"
fi
for pid in $pids; do
  lim=$(awk '/^Max open files/ {print $4}' "/proc/$pid/limits" 2>/dev/null)
  if [ "$lim" = unlimited ] || [ "${lim:-0}" -ge "$want_nofile" ]; then
    row "game-gateway pid $pid nofile" "$lim" ">= $want_nofile" "ok"
  else
    row "game-gateway pid $pid nofile" "${lim:-?}" ">= $want_nofile" "DIFF (LimitNOFILE in the unit, restart)"
  fi
done

# --- NIC interrupts ---------------------------------------------------------------------
if [ -n "$workers" ]; then
  if [ ${#ifaces[@]} -eq 0 ]; then
    for d in "$ROOT"/sys/class/net/*; do
      [ -e "$d/device" ] && ifaces+=("$(basename "$d")")
    done
  fi
  nirq=0
  for ifc in "${ifaces[@]}"; do
    irqs=""
    if [ -d "$ROOT/sys/class/net/$ifc/device/msi_irqs" ]; then
      irqs=$(ls "$ROOT/sys/class/net/$ifc/device/msi_irqs")
    elif [ -r "$ROOT/proc/interrupts" ]; then
      irqs=$(awk -v i="$ifc" '$NF ~ i {sub(":", "", $1); print $1}' "$ROOT/proc/interrupts")
    fi
    for irq in $irqs; do
      f="$ROOT/proc/irq/$irq/smp_affinity_list"
      [ -r "$f" ] || continue
      nirq=$((nirq + 1))
      cur=$(cat "$f")
      curl=$(expand_cpus "$cur" 2>/dev/null || echo "$cur")
      clash=""
      for c in $curl; do grep -qw "$c" <<< "$workers" && clash+="$c "; done
      if [ -z "$clash" ]; then
        row "irq $irq ($ifc) affinity" "$cur" "$housekeeping_spec" "ok"
      elif [ "$apply" = 1 ]; then
        if printf '%s\n' "$housekeeping_spec" > "$f" 2>/dev/null; then
          row "irq $irq ($ifc) affinity" "$cur" "$housekeeping_spec" "APPLIED"
        else
          row "irq $irq ($ifc) affinity" "$cur" "$housekeeping_spec" "FAILED (managed IRQ?)"
        fi
      else
        row "irq $irq ($ifc) affinity" "$cur" "$housekeeping_spec" "DIFF (on worker CPUs $(compress_cpus $clash))"
      fi
    done
  done
  [ "$nirq" = 0 ] && row "NIC interrupts" "none found (${ifaces[*]:-no NIC})" "off CPUs $worker_spec" "n/a"

  # irqbalance: running and not banned from the workers, it moves the
  # interrupts back within seconds.
  ib_running=no
  if [ -z "$ROOT" ] && pgrep -x irqbalance >/dev/null 2>&1; then ib_running=yes; fi
  ib_conf="$ROOT/etc/default/irqbalance"
  banned=$(sed -n 's/^IRQBALANCE_BANNED_CPULIST=//p' "$ib_conf" 2>/dev/null | tr -d '"' | tail -1)
  if [ "$ib_running" = no ]; then
    row "irqbalance" "not running" "stopped, or banned from $worker_spec" "ok"
  elif [ -n "$banned" ] && [ "$(expand_cpus "$banned")" = "$workers" ]; then
    row "irqbalance" "running, banned $banned" "banned from $worker_spec" "ok"
  elif [ "$apply" = 1 ]; then
    mkdir -p "$(dirname "$ib_conf")"
    touch "$ib_conf"
    sed -i '/^IRQBALANCE_BANNED_CPULIST=/d' "$ib_conf"
    echo "IRQBALANCE_BANNED_CPULIST=$worker_spec" >> "$ib_conf"
    if command -v systemctl >/dev/null 2>&1 && systemctl restart irqbalance 2>/dev/null; then
      row "irqbalance" "running, banned ${banned:-none}" "banned from $worker_spec" "APPLIED (restarted)"
    else
      row "irqbalance" "running, banned ${banned:-none}" "banned from $worker_spec" "FAILED (restart irqbalance)"
    fi
  else
    row "irqbalance" "running, banned ${banned:-none}" "banned from $worker_spec" "DIFF"
  fi

  # CPU frequency governor of the worker CPUs.
  for c in $workers; do
    g="$ROOT/sys/devices/system/cpu/cpu$c/cpufreq/scaling_governor"
    if [ ! -r "$g" ]; then
      row "cpu$c governor" "no cpufreq" "performance" "n/a"
      continue
    fi
    cur=$(cat "$g")
    if [ "$cur" = performance ]; then
      row "cpu$c governor" "$cur" "performance" "ok"
    elif [ "$apply" = 1 ]; then
      if echo performance > "$g" 2>/dev/null; then row "cpu$c governor" "$cur" "performance" "APPLIED"
      else row "cpu$c governor" "$cur" "performance" "FAILED"; fi
    else
      row "cpu$c governor" "$cur" "performance" "DIFF"
    fi
  done
else
  row "NIC interrupts, irqbalance, governor" "-" "give --worker-cpus LIST" "skipped"
fi

# --- report ------------------------------------------------------------------------------
echo "game-gateway host check ($([ "$apply" = 1 ] && echo apply || echo "check only, nothing changed"))" \
  "- online CPUs $online_spec${worker_spec:+, workers $worker_spec, interrupts to $housekeeping_spec}"
{
  printf 'ITEM\tCURRENT\tRECOMMENDED\tSTATUS\n'
  printf '%s\n' "${rows[@]}"
} | column -t -s $'\t' 2>/dev/null || { printf 'ITEM\tCURRENT\tRECOMMENDED\tSTATUS\n'; printf '%s\n' "${rows[@]}"; }
echo "differs: $differs, failed: $failed"
if [ "$differs" -gt 0 ] && [ "$apply" = 0 ]; then
  echo "re-run with --apply (root) to set them; --persist also writes /etc/sysctl.d/90-game-gateway.conf"
fi
[ "$failed" -gt 0 ] && exit 1
[ "$strict" = 1 ] && [ "$differs" -gt 0 ] && exit 1
exit 0
