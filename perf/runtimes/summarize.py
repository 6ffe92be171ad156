#!/usr/bin/env python3
"""Summary table for perf/runtimes/compare.sh: the median over every round in
the given results.jsonl files (one run, or several runs pooled).

Usage: summarize.py RESULTS.jsonl [RESULTS.jsonl...] > summary.md"""
import datetime, json, platform, statistics, subprocess, sys

files = sys.argv[1:]
rows = [json.loads(l) for f in files for l in open(f) if l.strip()]
runs = [r for r in rows if r.get("round")]
peers = list(dict.fromkeys(r["peer"] for r in runs))
loads = [l for l in ["100x1", "100x16", "1000x1"] if any(r["load"] == l for r in runs)]
n = len({(f, r["round"]) for f in files for r in (json.loads(l) for l in open(f) if l.strip()) if r.get("round")})
secs = {r.get("seconds") and round(r["seconds"]) for r in runs} - {None}


def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def vals(load, peer, key):
    return [r[key] for r in runs if r["load"] == load and r["peer"] == peer and r.get(key) is not None]


def med(load, peer, key):
    v = vals(load, peer, key)
    return statistics.median(v) if v else None


def rng(load, peer, key, fmt):
    v = vals(load, peer, key)
    return f"{fmt.format(min(v))}–{fmt.format(max(v))}" if len(v) > 1 else "-"


cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
load1 = open("/proc/loadavg").read().split()[0]
out = [f"Summary written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {cpu}, {cores} cores, "
       f"Linux {platform.release()}; {'/'.join(str(s) for s in sorted(secs))} s per load, {n} round(s) pooled "
       f"from {len(files)} run(s) (median shown, peers' order rotating per round), 64-byte payloads; "
       f"load average {load1} when written: the machine is shared with other jobs, so the absolute rates "
       f"move between rounds; compare peers within the table, CPU per message first.\n"]
out.append("| load | peer | msgs/s | msgs/s range | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/msg | CPU range |")
out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for load in loads:
    for peer in peers:
        out.append(f"| {load} | {peer} | {f(med(load, peer, 'msgs_per_sec'))} | {rng(load, peer, 'msgs_per_sec', '{:,.0f}')} | "
                   f"{f(med(load, peer, 'p50_us'))} | {f(med(load, peer, 'p99_us'))} | {f(med(load, peer, 'p999_us'))} | "
                   f"{f(med(load, peer, 'cpu_us_per_msg'), '{:.2f}')} | {rng(load, peer, 'cpu_us_per_msg', '{:.1f}')} |")
out.append("")
out.append("Ratios of the medians (and, for CPU, the range of the per-round ratios: same round, same machine state):\n")
out.append("| ratio | load | msgs/s | p99 | CPU per msg | CPU per msg, per round |")
out.append("|---|---|---:|---:|---:|---:|")
for a, b in [("glommio", "monoio"), ("monoio-epoll", "monoio"), ("monoio", "haproxy"), ("glommio", "haproxy")]:
    if a not in peers or b not in peers:
        continue
    for load in loads:
        def ratio(key):
            x, y = med(load, a, key), med(load, b, key)
            return x / y if x is not None and y else None
        per = []
        for fi in files:
            rs = [json.loads(l) for l in open(fi) if l.strip()]
            for rd in {r.get("round") for r in rs if r.get("round")}:
                x = [r.get("cpu_us_per_msg") for r in rs if r.get("round") == rd and r["load"] == load and r["peer"] == a]
                y = [r.get("cpu_us_per_msg") for r in rs if r.get("round") == rd and r["load"] == load and r["peer"] == b]
                if x and y and x[0] and y[0]:
                    per.append(x[0] / y[0])
        pr = f"{min(per):.2f}–{max(per):.2f}" if per else "-"
        out.append(f"| {a} / {b} | {load} | {f(ratio('msgs_per_sec'), '{:.2f}')} | {f(ratio('p99_us'), '{:.2f}')} | "
                   f"{f(ratio('cpu_us_per_msg'), '{:.2f}')} | {pr} |")
bad = [f"{r['peer']}-{r['load']} round {r['round']} (errors {r.get('errors')}, missing {r.get('missing')})"
       for r in runs if r.get("errors") or r.get("missing") or r.get("error") is not None]
out.append("")
out.append("Runs with errors or missing replies: " + (", ".join(bad) if bad else "none") + ".")
idle = [r for r in rows if r.get("load") == "idle-3s"]
if idle:
    out.append("")
    worst = {}
    for r in idle:
        worst[r["peer"]] = max(worst.get(r["peer"], 0.0), r["proxy_cpu_s"])
    out.append("Idle CPU over 3 s with no load (most of any run): " + ", ".join(f"{p} {c:.2f} s" for p, c in worst.items()) + ".")
print("\n".join(out))
