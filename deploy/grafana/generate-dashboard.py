#!/usr/bin/env python3
"""Writes the Grafana dashboard for game-gateway:
deploy/kubernetes/components/monitoring/game-gateway-dashboard.json
(the Kubernetes ConfigMap reads it from there; on bare metal import the same
file in Grafana). Edit the panels here and re-run; scripts/check-deploy.sh
fails when the committed JSON differs from what this prints.

Usage: deploy/grafana/generate-dashboard.py [--check]
"""
import json
import os
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kubernetes", "components", "monitoring",
                   "game-gateway-dashboard.json")
SEL = 'job="$job", instance=~"$instance"'
DS = {"type": "prometheus", "uid": "${datasource}"}

panels = []
_next_id = [1]
_y = [0]


def _id():
    i = _next_id[0]
    _next_id[0] += 1
    return i


def row(title):
    panels.append({"type": "row", "title": title, "id": _id(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": _y[0]}, "panels": []})
    _y[0] += 1


_x = [0]


def panel(kind, title, targets, w=8, h=8, unit="short", description="", extra=None):
    if _x[0] + w > 24:
        _x[0] = 0
        _y[0] += h
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "id": _id(),
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": _x[0], "y": _y[0]},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    if extra:
        for k, v in extra.items():
            if isinstance(v, dict) and isinstance(p.get(k), dict):
                p[k].update(v)
            else:
                p[k] = v
    panels.append(p)
    _x[0] += w


def endrow(h=8):
    if _x[0] > 0:
        _y[0] += h
    _x[0] = 0


def q(expr):
    return expr.replace("SEL", SEL)


row("Overview")
panel("stat", "Active connections", [(q("sum(game_gateway_connections_active{SEL})"), "connections")], w=4, h=4)
panel("stat", "Active sessions", [(q("sum(game_gateway_sessions_active{SEL})"), "sessions")], w=4, h=4)
panel("stat", "New connections", [(q("sum(rate(game_gateway_connections_total{SEL}[$__rate_interval]))"), "per second")],
      w=4, h=4, unit="cps")
panel("stat", "Gateways up", [('count(up{job="$job", instance=~"$instance"} == 1)', "up")], w=4, h=4)
panel("stat", "Workers responsive",
      [(q("sum(game_gateway_workers_responsive{SEL}) / count(game_gateway_worker_info{SEL})"), "responsive")],
      w=4, h=4, unit="percentunit",
      description="Workers that answered the last scrape over all workers; below 100% a core is stuck.")
panel("stat", "Redis up (min)", [(q("min(game_gateway_redis_up{SEL})"), "redis")], w=4, h=4,
      description="1 when every gateway read its routes from Redis; 0 when one cannot, or [redis] is not configured.",
      extra={"fieldConfig": {"defaults": {"unit": "short", "mappings": [
          {"type": "value", "options": {"0": {"text": "down/off", "color": "red"}, "1": {"text": "up", "color": "green"}}}]}}})
endrow(4)

row("Traffic")
panel("timeseries", "Messages processed", [
    (q("sum by (direction, server_type) (rate(game_gateway_messages_processed_total{SEL}[$__rate_interval]))"),
     "{{direction}} type {{server_type}}")], w=12, unit="ops")
panel("timeseries", "Connections by gateway", [
    (q("game_gateway_connections_active{SEL}"), "{{instance}} connections"),
    (q("game_gateway_sessions_active{SEL}"), "{{instance}} sessions")], w=12)
panel("timeseries", "Connection rate", [
    (q("sum(rate(game_gateway_connections_total{SEL}[$__rate_interval]))"), "accepted"),
    (q("sum(rate(game_gateway_websocket_upgrades_total{SEL}[$__rate_interval]))"), "WebSocket upgrades")],
    w=12, unit="cps")
panel("timeseries", "Sessions closed by reason", [
    (q("sum by (reason) (rate(game_gateway_sessions_closed_total{SEL}[$__rate_interval]))"), "{{reason}}")],
    w=12, unit="ops")
endrow()

row("Errors and protection")
panel("timeseries", "Routing errors", [
    (q("sum by (type) (rate(game_gateway_routing_errors_total{SEL}[$__rate_interval]))"), "{{type}}")],
    unit="ops", extra={"fieldConfig": {"defaults": {"unit": "ops", "custom": {"drawStyle": "bars", "fillOpacity": 80}}}})
panel("timeseries", "Routing error ratio", [
    (q("sum(rate(game_gateway_routing_errors_total{SEL}[$__rate_interval])) / "
       "sum(rate(game_gateway_messages_processed_total{SEL, direction=\"client_to_backend\"}[$__rate_interval]))"),
     "errors / forwarded")], unit="percentunit")
panel("timeseries", "Rate-limit rejections", [
    (q("sum by (limit) (rate(game_gateway_rate_limit_rejected_total{SEL}[$__rate_interval]))"), "{{limit}}")],
    unit="ops")
panel("timeseries", "Connections rejected", [
    # refusal: ours; reason: the Go gateway's coarser value.
    (q("sum by (refusal) (rate(game_gateway_connection_rejected_total{SEL}[$__rate_interval]))"), "{{refusal}}")],
    unit="cps")
panel("timeseries", "Frames dropped", [
    (q("sum by (reason) (rate(game_gateway_frames_dropped_total{SEL}[$__rate_interval]))"), "{{reason}}")],
    unit="ops")
panel("timeseries", "Protocol errors and timeouts", [
    (q("sum by (kind) (rate(game_gateway_protocol_errors_total{SEL}[$__rate_interval]))"), "{{kind}}")],
    unit="ops")
endrow()

row("Latency")
panel("timeseries", "Connection setup latency", [
    (q("histogram_quantile(0.50, sum by (le) (rate(game_gateway_connection_setup_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p50"),
    (q("histogram_quantile(0.95, sum by (le) (rate(game_gateway_connection_setup_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p95"),
    (q("histogram_quantile(0.99, sum by (le) (rate(game_gateway_connection_setup_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p99")],
    w=12, unit="s", description="Accept to the first client frame queued towards a backend (includes the client's wait before its first frame).")
panel("timeseries", "Forward latency (time inside the gateway)", [
    (q("histogram_quantile(0.99, sum by (le, direction) (rate(game_gateway_forward_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p99 {{direction}}"),
    (q("histogram_quantile(0.50, sum by (le, direction) (rate(game_gateway_forward_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p50 {{direction}}")],
    w=12, unit="s")
panel("timeseries", "Backend dial latency", [
    (q("histogram_quantile(0.99, sum by (le) (rate(game_gateway_backend_connection_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p99"),
    (q("histogram_quantile(0.50, sum by (le) (rate(game_gateway_backend_connection_latency_seconds_bucket{SEL}[$__rate_interval])))"), "p50")],
    w=12, unit="s")
panel("timeseries", "Backend keep-alive round trip", [
    (q("histogram_quantile(0.99, sum by (le, backend) (rate(game_gateway_backend_rtt_seconds_bucket{SEL}[$__rate_interval])))"), "p99 {{backend}}")],
    w=12, unit="s")
endrow()

row("Backends")
panel("timeseries", "Circuit breaker state", [(q("max by (backend) (game_gateway_circuit_breaker_state{SEL})"), "{{backend}}")],
      description="0 closed, 1 open, 2 half-open (worst over gateways and workers).",
      extra={"fieldConfig": {"defaults": {"unit": "short", "min": 0, "max": 2, "mappings": [
          {"type": "value", "options": {"0": {"text": "closed"}, "1": {"text": "open"}, "2": {"text": "half-open"}}}]}}})
panel("timeseries", "Backend connections up", [
    (q("sum by (backend) (game_gateway_backend_connections_active{SEL})"), "{{backend}}")])
panel("timeseries", "Backend errors", [
    (q("sum by (backend, type) (rate(game_gateway_backend_errors_total{SEL}[$__rate_interval]))"), "{{backend}} {{type}}")],
    unit="ops")
panel("timeseries", "Backend dials, retries, timeouts", [
    (q("sum by (backend) (rate(game_gateway_backend_dials_total{SEL}[$__rate_interval]))"), "dials {{backend}}"),
    (q("sum by (backend) (rate(game_gateway_backend_retries_total{SEL}[$__rate_interval]))"), "retries {{backend}}"),
    (q("sum by (backend) (rate(game_gateway_backend_timeouts_total{SEL}[$__rate_interval]))"), "timeouts {{backend}}")],
    unit="ops")
panel("timeseries", "Backend traffic", [
    (q("sum by (backend, direction) (rate(game_gateway_backend_bytes_transmitted_total{SEL}[$__rate_interval]))"), "{{backend}} {{direction}}")],
    w=16, unit="Bps")
endrow()

row("Control plane")
panel("timeseries", "Route snapshot version", [(q("game_gateway_route_snapshot_version{SEL}"), "{{instance}}")])
panel("timeseries", "Route reads from Redis", [
    # One read covers both keys: each config_type carries the same count.
    (q("sum(rate(game_gateway_config_refresh_success_total{SEL, config_type=\"routing_rules\"}[$__rate_interval]))"), "ok"),
    (q("sum(rate(game_gateway_config_refresh_errors_total{SEL, config_type=\"routing_rules\"}[$__rate_interval]))"), "failed"),
    (q("sum(increase(game_gateway_route_snapshots_rejected_total{SEL}[$__rate_interval]))"), "snapshots rejected")],
    unit="short")
panel("timeseries", "Config file reloads", [
    (q("sum(increase(game_gateway_config_reloads_total{SEL}[$__rate_interval]))"), "applied"),
    (q("sum(increase(game_gateway_config_reload_errors_total{SEL}[$__rate_interval]))"), "rejected")])
panel("timeseries", "Access log", [
    (q("sum(rate(game_gateway_access_log_records_total{SEL}[$__rate_interval]))"), "written"),
    (q("sum(rate(game_gateway_access_log_dropped_total{SEL}[$__rate_interval]))"), "dropped")], unit="ops")
panel("table", "Workers", [(q("game_gateway_worker_info{SEL}"), "")], w=16,
      description="One row per worker: its core and I/O driver.",
      extra={"targets": [{"refId": "A", "datasource": DS, "expr": q("game_gateway_worker_info{SEL}"),
                          "format": "table", "instant": True, "range": False}],
             "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True,
                                                                                   "__name__": True}}}]})
endrow()

dashboard = {
    "uid": "game-gateway",
    "title": "game-gateway",
    "description": "Thread-per-core game gateway: traffic, errors, latency, backends, control plane.",
    "tags": ["game-gateway"],
    "timezone": "browser",
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "graphTooltip": 1,
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1},
        {"name": "job", "label": "Job", "type": "custom", "query": "game-gateway",
         "current": {"text": "game-gateway", "value": "game-gateway"}, "hide": 0,
         "options": [{"text": "game-gateway", "value": "game-gateway", "selected": True}]},
        {"name": "instance", "label": "Gateway", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(game_gateway_worker_info{job="$job"}, instance)', "refId": "instance"},
         "definition": 'label_values(game_gateway_worker_info{job="$job"}, instance)',
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "refresh": 2, "sort": 1, "hide": 0},
    ]},
    "panels": panels,
}

text = json.dumps(dashboard, indent=2, sort_keys=False) + "\n"
if "--check" in sys.argv[1:]:
    with open(OUT) as f:
        if f.read() != text:
            sys.exit(f"{OUT} is out of date: run deploy/grafana/generate-dashboard.py")
    print(f"{os.path.relpath(OUT)} is up to date ({len(panels)} panels)")
else:
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT} ({len(panels)} panels)")
