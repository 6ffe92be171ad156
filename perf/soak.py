#!/usr/bin/env python3
"""Helper of perf/soak.sh (standard library only).

  soak.py sample OUT_DIR ADMIN PID T0   append one row to OUT_DIR/soak.csv
  soak.py summarize OUT_DIR             write OUT_DIR/summary.md and print it

A sample reads the gateway's RSS, open fds and threads from /proc, its
counters and forward-latency histogram from /metrics (per-window deltas,
kept between samples in OUT_DIR/.state.json), the last probe's end-to-end
percentiles (OUT_DIR/probes.jsonl) and the open-loop load's running error
count (OUT_DIR/open-progress.log).
"""
import json
import os
import re
import sys
import time
import urllib.request

COLUMNS = [
    "t_s", "rss_kib", "fds", "threads", "sessions", "backend_conns",
    "msgs_in_total", "msgs_out_total", "msgs_in_per_s", "msgs_out_per_s",
    "dropped_total", "dropped_in_window", "routing_errors_total", "reloads_total", "route_version",
    "fwd_c2b_p50_us", "fwd_c2b_p99_us", "fwd_b2c_p50_us", "fwd_b2c_p99_us",
    "probe_p50_us", "probe_p99_us", "probe_missing", "probe_errors", "open_load_errors",
]

METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')


def scrape(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def total(m, name, want=()):
    """Sum of a family's samples whose labels contain every `want` pair."""
    s = 0.0
    for k, v in m.items():
        if k == name or (k.startswith(name + "{") and all(w in k for w in want)):
            s += v
    return s


def buckets(m, direction):
    """Cumulative (le, count) of the forward latency histogram."""
    out = []
    for k, v in m.items():
        if k.startswith("game_gateway_forward_latency_seconds_bucket{") and f'direction="{direction}"' in k:
            le = re.search(r'le="([^"]+)"', k).group(1)
            out.append((float("inf") if le == "+Inf" else float(le), v))
    return sorted(out)


def quantile_us(prev, cur, q):
    """Upper bound (µs) of the bucket holding quantile q of the window."""
    p = dict(prev)
    window = [(le, c - p.get(le, 0.0)) for le, c in cur]
    n = window[-1][1] if window else 0
    if n <= 0:
        return ""
    for le, c in window:
        if c >= q * n:
            return "" if le == float("inf") else round(le * 1e6)
    return ""


def proc(pid):
    st = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.strip()
    rss = int(st["VmRSS"].split()[0])
    threads = int(st["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


def last_json(path):
    try:
        with open(path) as f:
            lines = [l for l in f if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def open_errors(path):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        for line in reversed(lines):
            m = re.search(r"errors (\d+)", line)
            if m:
                return int(m.group(1))
    except OSError:
        pass
    return ""


def sample(out, admin, pid, t0):
    now = time.time()
    rss, fds, threads = proc(int(pid))
    m = scrape(admin)
    state_path = os.path.join(out, ".state.json")
    try:
        with open(state_path) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        prev = {}
    msgs_in = total(m, "game_gateway_messages_processed_total", ['direction="client_to_backend"'])
    msgs_out = total(m, "game_gateway_messages_processed_total", ['direction="backend_to_client"'])
    dropped = total(m, "game_gateway_frames_dropped_total")
    c2b, b2c = buckets(m, "client_to_backend"), buckets(m, "backend_to_client")
    dt = now - prev["time"] if prev else 0.0
    rate = lambda cur, key: round((cur - prev[key]) / dt) if prev and dt > 0 else ""
    probe = last_json(os.path.join(out, "probes.jsonl"))
    row = {
        "t_s": round(now - float(t0)),
        "rss_kib": rss,
        "fds": fds,
        "threads": threads,
        "sessions": int(total(m, "game_gateway_sessions_active")),
        "backend_conns": int(total(m, "game_gateway_backend_connections_active")),
        "msgs_in_total": int(msgs_in),
        "msgs_out_total": int(msgs_out),
        "msgs_in_per_s": rate(msgs_in, "msgs_in"),
        "msgs_out_per_s": rate(msgs_out, "msgs_out"),
        "dropped_total": int(dropped),
        "dropped_in_window": int(dropped - prev.get("dropped", 0)) if prev else "",
        "routing_errors_total": int(total(m, "game_gateway_routing_errors_total")),
        "reloads_total": int(total(m, "game_gateway_config_reloads_total")),
        "route_version": int(total(m, "game_gateway_route_snapshot_version")),
        "fwd_c2b_p50_us": quantile_us(prev.get("c2b", []), c2b, 0.5),
        "fwd_c2b_p99_us": quantile_us(prev.get("c2b", []), c2b, 0.99),
        "fwd_b2c_p50_us": quantile_us(prev.get("b2c", []), b2c, 0.5),
        "fwd_b2c_p99_us": quantile_us(prev.get("b2c", []), b2c, 0.99),
        "probe_p50_us": probe.get("p50_us", ""),
        "probe_p99_us": probe.get("p99_us", ""),
        "probe_missing": probe.get("missing", ""),
        "probe_errors": probe.get("errors", ""),
        "open_load_errors": open_errors(os.path.join(out, "open-progress.log")),
    }
    csv = os.path.join(out, "soak.csv")
    new = not os.path.exists(csv)
    with open(csv, "a") as f:
        if new:
            f.write(",".join(COLUMNS) + "\n")
        f.write(",".join(str(row[c]) for c in COLUMNS) + "\n")
    drops = {re.search(r'reason="([^"]+)"', k).group(1): int(v)
             for k, v in m.items() if k.startswith("game_gateway_frames_dropped_total{") and v > 0}
    with open(state_path, "w") as f:
        json.dump({"time": now, "msgs_in": msgs_in, "msgs_out": msgs_out, "dropped": dropped,
                   "c2b": c2b, "b2c": b2c, "drops": drops,
                   "sessions_closed": {re.search(r'reason="([^"]+)"', k).group(1): int(v)
                                       for k, v in m.items()
                                       if k.startswith("game_gateway_sessions_closed_total{") and v > 0},
                   "backend_errors": {k: int(v) for k, v in m.items()
                                      if k.startswith("game_gateway_backend_errors_total{") and v > 0}},
                  f, default=lambda x: None)


def read_csv(path):
    with open(path) as f:
        head = f.readline().strip().split(",")
        rows = []
        for line in f:
            vals = line.strip().split(",")
            rows.append({h: (float(v) if v not in ("",) else None) for h, v in zip(head, vals)})
    return rows


def slope_per_hour(xs, ys):
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * 3600.0


def fmt(v, unit=""):
    return "-" if v is None else f"{v:,.0f}{unit}"


def summarize(out):
    rows = read_csv(os.path.join(out, "soak.csv"))
    # The last row is taken after the load ended; the trend uses the loaded run.
    loaded = rows[:-1] if len(rows) > 2 else rows
    half = loaded[len(loaded) // 2:]
    xs = [r["t_s"] for r in half]
    rss_slope = slope_per_hour(xs, [r["rss_kib"] for r in half])
    fd_slope = slope_per_hour(xs, [r["fds"] for r in half])
    first, last, end = loaded[0], loaded[-1], rows[-1]
    peak_rss = max(r["rss_kib"] for r in rows)
    peak_fds = max(r["fds"] for r in rows)
    try:
        with open(os.path.join(out, ".state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    loads = []
    try:
        with open(os.path.join(out, "loads.jsonl")) as f:
            loads = [json.loads(l) for l in f if l.startswith("{")]
    except OSError:
        pass
    churn = []
    try:
        with open(os.path.join(out, "churn.jsonl")) as f:
            churn = [json.loads(l) for l in f if l.startswith("{")]
    except OSError:
        pass
    probes = []
    try:
        with open(os.path.join(out, "probes.jsonl")) as f:
            probes = [json.loads(l) for l in f if l.startswith("{")]
    except OSError:
        pass
    flips = 0
    try:
        with open(os.path.join(out, "flips.log")) as f:
            flips = sum(1 for _ in f)
    except OSError:
        pass
    readme = ""
    try:
        with open(os.path.join(out, "README")) as f:
            readme = f.read().strip()
    except OSError:
        pass

    duration = last["t_s"]
    L = []
    L.append(f"# Soak {os.path.basename(out)}")
    L.append("")
    L.append("```")
    L.append(readme)
    L.append("```")
    L.append("")
    L.append("## Resources")
    L.append("")
    L.append("| | start | end (loaded) | after the load | peak |")
    L.append("|---|---:|---:|---:|---:|")
    L.append(f"| RSS KiB | {fmt(first['rss_kib'])} | {fmt(last['rss_kib'])} | {fmt(end['rss_kib'])} | {fmt(peak_rss)} |")
    L.append(f"| open fds | {fmt(first['fds'])} | {fmt(last['fds'])} | {fmt(end['fds'])} | {fmt(peak_fds)} |")
    L.append(f"| threads | {fmt(first['threads'])} | {fmt(last['threads'])} | {fmt(end['threads'])} | |")
    L.append(f"| sessions | {fmt(first['sessions'])} | {fmt(last['sessions'])} | {fmt(end['sessions'])} | |")
    L.append("")
    L.append(f"- RSS slope over the second half ({fmt(xs[0])}-{fmt(xs[-1])} s, {len(half)} samples, least squares): "
             f"**{rss_slope:+,.0f} KiB/hour**")
    L.append(f"- fd growth: {fmt(last['fds'] - first['fds'], ' fds')} start to end of the load "
             f"(second-half slope {fd_slope:+,.1f} fds/hour); {fmt(end['fds'] - first['fds'], ' fds')} after it")
    L.append("")
    L.append("## Traffic")
    L.append("")
    rates = [r["msgs_in_per_s"] for r in loaded if r["msgs_in_per_s"] is not None]
    L.append(f"- {duration:,.0f} s; frames client->backend {fmt(last['msgs_in_total'])} "
             f"({fmt(sum(rates) / len(rates) if rates else None)}/s mean), backend->client {fmt(last['msgs_out_total'])}")
    L.append(f"- route flips + SIGHUP: {flips}; config reloads applied: {fmt(last['reloads_total'])}; "
             f"route snapshot version at the end: {fmt(last['route_version'])}")
    # gw-load's `sessions` is its configured count; the churned sessions are
    # its rate over the measured time.
    cs = round(sum(c.get("sessions_per_sec", 0) * c.get("seconds", 0) for c in churn))
    ce = sum(c.get("errors", 0) for c in churn)
    L.append(f"- churn: {len(churn)} bursts, {cs:,} sessions measured, {ce} errors")
    for ld in loads:
        L.append(f"- {ld['label']}: {ld['msgs_per_sec']:,.0f} msgs/s, p50 {ld['p50_us']:,} µs, p99 {ld['p99_us']:,} µs, "
                 f"p99.9 {ld['p999_us']:,} µs, max {ld['max_us']:,} µs; replies {ld['replies']:,}, "
                 f"missing {ld['missing']:,}, errors {ld['errors']}")
    # Every forwarded frame is echoed by the mock backends, so after the load
    # forwarded - delivered - counted drops = replies lost without a count.
    unaccounted = end["msgs_in_total"] - end["msgs_out_total"] - end["dropped_total"]
    L.append(f"- gateway ledger after the load: forwarded {fmt(end['msgs_in_total'])}, delivered "
             f"{fmt(end['msgs_out_total'])}, counted drops {fmt(end['dropped_total'])}: "
             f"**{fmt(unaccounted)} replies lost without a count**"
             + (f" ({unaccounted / flips:.2f} per route flip)" if flips else ""))
    pm = sum(p.get("missing", 0) for p in probes)
    pe = sum(p.get("errors", 0) for p in probes)
    L.append(f"- probes: {len(probes)} runs, missing replies {pm}, errors {pe}")
    L.append(f"- frames dropped (gateway counters, whole run): {state.get('drops') or 'none'}")
    L.append(f"- sessions closed by reason: {state.get('sessions_closed') or 'none'}")
    be = state.get("backend_errors") or {}
    L.append(f"- backend errors: {be or 'none'}")
    L.append("")
    L.append("## Latency over time")
    L.append("")
    L.append("Probe: 5 fresh sessions x 50 msgs/s for 2 s before each sample (end to end, µs). "
             "Forward: time inside the gateway from /metrics (bucket upper bounds, µs, per 10 s window).")
    L.append("")
    L.append("| t (s) | RSS KiB | fds | msgs/s in | probe p50 | probe p99 | fwd c2b p99 | fwd b2c p99 | dropped in window |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    step = max(1, len(loaded) // 30)
    for r in loaded[::step] + ([loaded[-1]] if (len(loaded) - 1) % step else []):
        L.append(f"| {fmt(r['t_s'])} | {fmt(r['rss_kib'])} | {fmt(r['fds'])} | {fmt(r['msgs_in_per_s'])} | "
                 f"{fmt(r['probe_p50_us'])} | {fmt(r['probe_p99_us'])} | {fmt(r['fwd_c2b_p99_us'])} | "
                 f"{fmt(r['fwd_b2c_p99_us'])} | {fmt(r['dropped_in_window'])} |")
    p99s = sorted(r["probe_p99_us"] for r in loaded if r["probe_p99_us"] is not None)
    if p99s:
        L.append("")
        L.append(f"Probe p99 over the run: median {p99s[len(p99s) // 2]:,.0f} µs, worst {p99s[-1]:,.0f} µs "
                 f"({len(p99s)} probes).")
    notes = os.path.join(out, "notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            L.append("")
            L.append(f.read().rstrip())
    text = "\n".join(L) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"RSS slope {rss_slope:+.0f} KiB/h; fds {first['fds']:.0f} -> {last['fds']:.0f}; results in {out}")


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "sample":
        sample(*sys.argv[2:6])
    elif len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
