#!/usr/bin/env python3
"""Helpers for scripts/check-deploy.sh (Python 3.11+, PyYAML).

  deploycheck.py gen-prometheusrule            write the PrometheusRule from alerts.yml
  deploycheck.py check-prometheusrule FILE...  the PrometheusRule (source and rendered) == alerts.yml
  deploycheck.py split RENDERED OUTDIR         core kinds -> OUTDIR/core.yaml, CRD kinds -> OUTDIR/crd-*.yaml
  deploycheck.py check-rendered RENDERED OVERLAY   the deployment rules (QoS, probes, grace, ...)
                                               of the gateway workload (StatefulSet or DaemonSet)
  deploycheck.py extract RENDERED KIND NAME KEY    print ConfigMap/Secret data KEY
  deploycheck.py check-unit UNIT CONFIG        systemd unit vs its config (stop timeout > drain)
  deploycheck.py metric-names FILE...          metric names used in rule files / dashboard JSON
  deploycheck.py check-alert-tests RULES TESTS  every alert has a firing and a quiet test case
  deploycheck.py rules-hosts RULES.json        host names used by endpoints of a rules file
  deploycheck.py toml-get TOML KEY             print the value of a dotted key (nothing when absent)
  deploycheck.py set-token-file TOML PATH      print TOML with [admin] token_file = PATH (same lines)
  deploycheck.py check-crds FILE...            ServiceMonitor / PrometheusRule against a strict schema
                                               (the fields of monitoring.coreos.com/v1 this repo may use)
"""
import base64
import json
import os
import re
import sys
import tomllib

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
ALERTS = os.path.join(DEPLOY, "prometheus", "alerts.yml")
K8S = os.path.join(DEPLOY, "kubernetes")
WORKLOAD_KINDS = ("StatefulSet", "DaemonSet")
PROMRULE = os.path.join(DEPLOY, "kubernetes", "components", "monitoring", "prometheusrule.yaml")
CRD_GROUPS = ("monitoring.coreos.com/",)

failures = []


def fail(msg):
    failures.append(msg)
    print(f"  FAIL {msg}")


def ok(msg):
    print(f"  ok   {msg}")


def done():
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def duration_seconds(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", s.strip())
    if not m:
        raise ValueError(f"bad duration {s!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# --- PrometheusRule <-> alerts.yml ------------------------------------------


def gen_prometheusrule():
    with open(ALERTS) as f:
        rules = yaml.safe_load(f)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "game-gateway-alerts",
            "labels": {"app.kubernetes.io/name": "game-gateway", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rules["groups"]},
    }
    header = (
        "# GENERATED from deploy/prometheus/alerts.yml by `scripts/check-deploy.sh --regen`.\n"
        "# Do not edit: edit alerts.yml (and alerts_test.yml) and regenerate;\n"
        "# scripts/check-deploy.sh fails when the two differ.\n"
        "# The release label is kube-prometheus-stack's default ruleSelector.\n"
    )
    with open(PROMRULE, "w") as f:
        f.write(header)
        yaml.safe_dump(doc, f, sort_keys=False, width=10000, allow_unicode=True)
    print(f"wrote {os.path.relpath(PROMRULE)}")


def check_prometheusrule(paths):
    with open(ALERTS) as f:
        want = yaml.safe_load(f)["groups"]
    for path in paths:
        found = [d for d in load_all(path) if d.get("kind") == "PrometheusRule"]
        if len(found) != 1:
            fail(f"{path}: expected one PrometheusRule, found {len(found)}")
            continue
        got = found[0]["spec"]["groups"]
        if got == want:
            n = sum(len(g["rules"]) for g in got)
            ok(f"{path}: PrometheusRule carries exactly the {n} rules of alerts.yml")
        else:
            fail(f"{path}: PrometheusRule differs from deploy/prometheus/alerts.yml (run scripts/check-deploy.sh --regen)")


# --- rendered manifests -------------------------------------------------------


def split(rendered, outdir):
    docs = load_all(rendered)
    core, crd = [], {}
    for d in docs:
        if d["apiVersion"].startswith(CRD_GROUPS):
            crd.setdefault(d["kind"], []).append(d)
        else:
            core.append(d)
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "core.yaml"), "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    for kind, ds in crd.items():
        with open(os.path.join(outdir, f"crd-{kind}.yaml"), "w") as f:
            yaml.safe_dump_all(ds, f, sort_keys=False)
        # PrometheusRule: the rule groups as a plain rule file for promtool.
        if kind == "PrometheusRule":
            with open(os.path.join(outdir, "prometheusrule-rules.yml"), "w") as f:
                yaml.safe_dump({"groups": [g for d in ds for g in d["spec"]["groups"]]}, f, sort_keys=False)
    print(f"{len(core)} core objects ({', '.join(sorted({d['kind'] for d in core}))}); "
          f"custom resources: {', '.join(f'{k} x{len(v)}' for k, v in sorted(crd.items())) or 'none'}")


def find(docs, kind, name=None):
    for d in docs:
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
            return d
    return None


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def cm_data(docs, kind, name, key):
    d = find(docs, kind, name)
    if d is None:
        return None
    if key in d.get("data", {}):
        v = d["data"][key]
        return base64.b64decode(v).decode() if kind == "Secret" else v
    return d.get("stringData", {}).get(key)


def check_rendered(rendered, overlay):
    docs = load_all(rendered)
    kinds = {d["kind"] for d in docs}
    print(f"-- {overlay}: {len(docs)} objects")
    # The gateway workload: a StatefulSet (host-network, pod-network) or a
    # DaemonSet (host-network-live-upgrade), exactly one.
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS and d["metadata"]["name"] == "game-gateway"]
    if len(workloads) != 1:
        fail(f"want one gateway workload (StatefulSet or DaemonSet game-gateway), found "
             f"{[d['kind'] for d in workloads] or 'none'}")
        return
    wl = workloads[0]
    wl_kind = wl["kind"]
    pod = wl["spec"]["template"]["spec"]
    pod_labels = wl["spec"]["template"]["metadata"]["labels"]
    ns = wl["metadata"].get("namespace")
    if not matches(wl["spec"]["selector"]["matchLabels"], pod_labels):
        fail(f"{wl_kind} selector {wl['spec']['selector']['matchLabels']} does not select its own pods")
    if wl_kind == "StatefulSet":
        ok(f"StatefulSet game-gateway in namespace {ns}, {wl['spec'].get('replicas', 1)} replicas")
    else:
        ok(f"DaemonSet game-gateway in namespace {ns}, one pod per node matching {pod.get('nodeSelector')}")
    for d in docs:
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != ns:
            fail(f"{d['kind']}/{d['metadata']['name']} is in namespace {d['metadata'].get('namespace')}, not {ns}")

    # Guaranteed QoS: every container (and init container) requests == limits,
    # cpu and memory set, cpu a whole number of cores.
    for c in pod.get("initContainers", []) + pod["containers"]:
        r = c.get("resources", {})
        req, lim = r.get("requests", {}), r.get("limits", {})
        if not (req.get("cpu") and req.get("memory") and req == lim):
            fail(f"container {c['name']}: requests {req} != limits {lim}: not Guaranteed QoS")
            continue
        if not re.fullmatch(r"[1-9]\d*", str(req["cpu"])):
            fail(f"container {c['name']}: cpu {req['cpu']!r} is not a whole number of cores (static CPU manager)")
            continue
        ok(f"container {c['name']}: Guaranteed QoS, {req['cpu']} whole cores, memory {req['memory']}")

    gw = next(c for c in pod["containers"] if c["name"] == "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        h = gw.get(probe, {}).get("httpGet", {})
        if h.get("path") == path and h.get("port") in ("admin", ports.get("admin")):
            ok(f"{probe} GET {path} on the admin port")
        else:
            fail(f"{probe} is {h}, want GET {path} on port admin")

    # The config the pod mounts.
    cfg_text = cm_data(docs, "ConfigMap", "game-gateway-config", "gateway.toml")
    if cfg_text is None:
        fail("ConfigMap game-gateway-config has no gateway.toml")
        return
    cfg = tomllib.loads(cfg_text)
    srv = cfg.get("server", {})
    admin_host = srv.get("admin_listen", "127.0.0.1:9090").rsplit(":", 1)
    if admin_host[0] in ("0.0.0.0", "[::]", "::"):
        ok(f"server.admin_listen {srv['admin_listen']} reachable by probes and Prometheus")
    else:
        fail(f"server.admin_listen {srv.get('admin_listen')} is not reachable from outside the pod")
    if int(admin_host[1]) != ports.get("admin"):
        fail(f"admin port {admin_host[1]} != containerPort admin {ports.get('admin')}")
    listen_port = int(srv.get("listen", "0.0.0.0:8080").rsplit(":", 1)[1])
    if listen_port != ports.get("game"):
        fail(f"game port {listen_port} != containerPort game {ports.get('game')}")
    drain = duration_seconds(srv.get("drain_timeout", "30s"))
    pre = gw.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace > drain + pre:
        ok(f"terminationGracePeriodSeconds {grace} > preStop {pre}s + drain_timeout {drain:g}s")
    else:
        fail(f"terminationGracePeriodSeconds {grace} <= preStop {pre}s + drain_timeout {drain:g}s")
    if srv.get("node_id", 0) == 0 and not any(e["name"] == "POD_NAME" for e in gw.get("env", [])):
        fail("node_id = 0 but POD_NAME is not set: node ids would collide")

    # Mounts: gateway.toml and the admin token where the config says.
    mounts = {m["name"]: m["mountPath"] for m in gw.get("volumeMounts", [])}
    files = {}
    for v in pod.get("volumes", []):
        if v["name"] not in mounts:
            continue
        base = mounts[v["name"]]
        if "projected" in v:
            for s in v["projected"]["sources"]:
                for kind in ("configMap", "secret"):
                    if kind in s:
                        for it in s[kind].get("items", []):
                            files[f"{base}/{it['path']}"] = (kind, s[kind]["name"], it["key"])
        for kind in ("configMap", "secret"):
            if kind in v:
                name = v[kind].get("name") or v[kind].get("secretName")
                for it in v[kind].get("items", []):
                    files[f"{base}/{it['path']}"] = (kind, name, it["key"])
    cfg_path = gw["args"][gw["args"].index("--config") + 1] if "--config" in gw.get("args", []) else None
    if cfg_path in files and files[cfg_path][1] == "game-gateway-config":
        ok(f"--config {cfg_path} is the ConfigMap's gateway.toml")
    else:
        fail(f"--config {cfg_path} is not mounted from ConfigMap game-gateway-config ({sorted(files)})")
    token_file = cfg.get("admin", {}).get("token_file")
    if token_file:
        src = files.get(token_file)
        if src and src[0] == "secret" and find(docs, "Secret", src[1]) is not None:
            token = cm_data(docs, "Secret", src[1], src[2]) or ""
            ok(f"[admin] token_file {token_file} is Secret {src[1]} key {src[2]}"
               + (" (still the PLACEHOLDER token: replace it before deploying)" if "REPLACE-ME" in token else ""))
            if token != token.strip():
                fail("the admin token has leading/trailing whitespace (a newline?)")
        else:
            fail(f"[admin] token_file {token_file} is not mounted from a Secret of this deployment")
    else:
        fail("no [admin] token_file: POST /drain on a non-loopback admin port needs the token")

    # Redis: the routes Job writes where the gateway reads.
    job = find(docs, "Job", "game-gateway-routes-push")
    if job is None:
        fail("no routes-push Job")
    else:
        jc = job["spec"]["template"]["spec"]["containers"][0]
        args = jc["args"]
        redis = cfg.get("redis")
        if not redis:
            fail("the routes Job pushes to Redis but the gateway config has no [redis]")
        else:
            url = args[args.index("--redis") + 1]
            prefix = args[args.index("--prefix") + 1] if "--prefix" in args else "game-gateway:"
            if url == redis.get("url") and prefix == redis.get("key_prefix", "game-gateway:"):
                ok(f"routes Job pushes to {url} prefix {prefix!r}, where the gateway reads")
            else:
                fail(f"routes Job pushes to {url} {prefix!r}, gateway reads {redis.get('url')} {redis.get('key_prefix')!r}")
        rules_path = args[args.index("push") + 1]
        jmounts = {m["name"]: m["mountPath"] for m in jc.get("volumeMounts", [])}
        vol = next((v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] in jmounts), None)
        cmname = vol and vol.get("configMap", {}).get("name")
        cm = cmname and find(docs, "ConfigMap", cmname)
        if cm and os.path.dirname(rules_path) == jmounts[vol["name"]] and os.path.basename(rules_path) in cm["data"]:
            json.loads(cm["data"][os.path.basename(rules_path)])
            ok(f"routes Job reads {rules_path} from ConfigMap {cmname} (valid JSON)")
        else:
            fail(f"routes Job's {rules_path} is not a key of a mounted ConfigMap")
        r = jc.get("resources", {})
        if r.get("requests") != r.get("limits"):
            fail("routes Job container is not Guaranteed QoS")

    # PodDisruptionBudget over the gateway pods.
    pdb = find(docs, "PodDisruptionBudget")
    if pdb and matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        ok(f"PodDisruptionBudget {pdb['metadata']['name']}: maxUnavailable {pdb['spec'].get('maxUnavailable')}")
    else:
        fail("no PodDisruptionBudget selecting the gateway pods")

    # Services select the pods; the ServiceMonitor selects the metrics Service.
    svcs = [d for d in docs if d["kind"] == "Service"]
    for s in svcs:
        if not matches(s["spec"]["selector"], pod_labels):
            fail(f"Service {s['metadata']['name']} does not select the gateway pods")
    if wl_kind == "StatefulSet":
        head = find(docs, "Service", wl["spec"].get("serviceName", ""))
        if head and head["spec"].get("clusterIP") == "None":
            ok(f"headless Service {head['metadata']['name']} governs the StatefulSet")
        else:
            fail(f"StatefulSet serviceName {wl['spec'].get('serviceName')} is not a headless Service here")
    sm = find(docs, "ServiceMonitor")
    if sm:
        sel = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in svcs if matches(sel, s["metadata"].get("labels", {}))]
        port = sm["spec"]["endpoints"][0]["port"]
        if len(targets) == 1 and any(p.get("name") == port for p in targets[0]["spec"]["ports"]):
            t = targets[0]["metadata"]["name"]
            ok(f"ServiceMonitor scrapes Service {t} port {port} (job label {t!r})")
            if t != "game-gateway":
                fail(f"alerts select job=\"game-gateway\" but the scraped Service is {t}")
        else:
            fail(f"ServiceMonitor selects {[s['metadata']['name'] for s in targets]}, want exactly one with port {port}")
    else:
        fail("no ServiceMonitor")
    if "PrometheusRule" not in kinds:
        fail("no PrometheusRule")
    dash = find(docs, "ConfigMap", "game-gateway-grafana-dashboard")
    if dash and dash["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
        (key, text), = dash["data"].items()
        d = json.loads(text)
        ok(f"Grafana dashboard ConfigMap ({key}: {len(d['panels'])} panels, uid {d['uid']})")
    else:
        fail("no Grafana dashboard ConfigMap labelled grafana_dashboard=1")

    # The gateway and the routes Job run the same image (an overlay's own
    # workload is not reached by base's images: entry).
    if job is not None:
        jimg = job["spec"]["template"]["spec"]["containers"][0]["image"]
        if gw["image"] == jimg:
            ok(f"gateway and routes Job run the same image {jimg}")
        else:
            fail(f"gateway image {gw['image']} != routes Job image {jimg} (set images: where both are reached)")

    # Overlay specifics.
    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    want_kind = "DaemonSet" if overlay == "host-network-live-upgrade" else "StatefulSet"
    if wl_kind != want_kind:
        fail(f"{overlay} overlay runs the gateway as a {wl_kind}, want a {want_kind}")
    if overlay in ("host-network", "host-network-live-upgrade"):
        if pod.get("hostNetwork") is True and pod.get("dnsPolicy") == "ClusterFirstWithHostNet":
            ok("hostNetwork with dnsPolicy ClusterFirstWithHostNet")
        else:
            fail(f"{overlay} overlay without hostNetwork: true / dnsPolicy: ClusterFirstWithHostNet")
    if overlay == "host-network-live-upgrade":
        check_live_upgrade(wl, pod, pod_labels, gw, cfg, cfg_text)
    elif overlay == "host-network":
        req = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        if any(t["topologyKey"] == "kubernetes.io/hostname" and matches(t["labelSelector"]["matchLabels"], pod_labels)
               for t in req):
            ok("required pod anti-affinity: one gateway per node")
        else:
            fail("host-network overlay without required anti-affinity on kubernetes.io/hostname")
        for p in gw["ports"]:
            if p.get("hostPort") not in (None, p["containerPort"]):
                fail(f"hostPort {p.get('hostPort')} != containerPort {p['containerPort']} under hostNetwork")
    elif overlay == "pod-network":
        if pod.get("hostNetwork"):
            fail("pod-network overlay uses hostNetwork")
        lb = [s for s in svcs if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
        if lb and any(p.get("targetPort") in ("game", ports["game"]) for p in lb[0]["spec"]["ports"]):
            ok(f"Service {lb[0]['metadata']['name']} ({lb[0]['spec']['type']}) exposes the game port, "
               f"externalTrafficPolicy {lb[0]['spec'].get('externalTrafficPolicy', 'Cluster')}")
        else:
            fail("pod-network overlay has no Service exposing the game port")


def _load_doc(path, kind=None):
    docs = load_all(path)
    return next((d for d in docs if kind is None or d.get("kind") == kind), None)


def _nonzero(v):
    """maxSurge / maxUnavailable: an int or a percentage."""
    return int(str(v).rstrip("%") or 0) > 0


def check_live_upgrade(wl, pod, pod_labels, gw, cfg, cfg_text):
    """overlays/host-network-live-upgrade: a DaemonSet whose surge pod takes
    over from the old one on the same node through a shared Unix socket."""
    strat = wl["spec"].get("updateStrategy", {})
    ru = strat.get("rollingUpdate", {})
    surge, unavail = ru.get("maxSurge", 0), ru.get("maxUnavailable", 1)
    if strat.get("type") == "RollingUpdate" and _nonzero(surge) and not _nonzero(unavail):
        ok(f"DaemonSet RollingUpdate maxSurge {surge}, maxUnavailable {unavail}: the new pod starts next to the old one")
    else:
        fail(f"DaemonSet updateStrategy {strat}: want RollingUpdate with maxSurge >= 1 and maxUnavailable 0 "
             "(the new pod must start while the old one runs)")
    host_ports = [f"{c['name']}:{p['containerPort']}" for c in pod.get("initContainers", []) + pod["containers"]
                  for p in c.get("ports", []) if p.get("hostPort")]
    if host_ports:
        fail(f"hostPort on {host_ports}: the surge pod would stay Pending next to the old one (port conflict)")
    else:
        ok("no hostPort: two gateway pods fit on a node during an upgrade")
    anti = pod.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    if any(matches(t.get("labelSelector", {}).get("matchLabels"), pod_labels) for t in anti):
        fail("required pod anti-affinity against the gateway pods: the surge pod would stay Pending")
    else:
        ok("no required anti-affinity against the gateway pods (the DaemonSet keeps one per node)")

    srv = cfg.get("server", {})
    sock = srv.get("upgrade_socket", "")
    if not sock or not os.path.isabs(sock):
        fail(f"server.upgrade_socket is {sock!r}: want an absolute path (the shared Unix socket)")
        return
    args = gw.get("args", [])
    if "--takeover-or-start" in args and args.index("--takeover-or-start") + 1 < len(args) \
            and args[args.index("--takeover-or-start") + 1] == sock:
        ok(f"args --takeover-or-start {sock} == server.upgrade_socket")
    else:
        fail(f"gateway args {args}: want --takeover-or-start {sock} (server.upgrade_socket)")
    if "--takeover" in args:
        fail("gateway args carry --takeover: the first pod on a node (nobody to take over from) would fail")
    if srv.get("after_handover") == "wait":
        ok('after_handover = "wait": the old pod stays idle until deleted (an exited container would restart and take back)')
    else:
        fail(f"server.after_handover is {srv.get('after_handover', 'exit')!r}, want \"wait\": an exited container is "
             "restarted, and with --takeover-or-start it would take everything back from the new pod")

    # The socket's directory: a writable hostPath both pods mount.
    d = os.path.dirname(sock)
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mount = next((m for m in gw.get("volumeMounts", []) if m["mountPath"] == d), None)
    hp = vols.get(mount["name"], {}).get("hostPath") if mount else None
    if mount and hp and not mount.get("readOnly") and hp.get("type") in ("DirectoryOrCreate", "Directory") \
            and hp.get("path") == "/run/game-gateway":
        ok(f"{d} is hostPath {hp['path']} ({hp['type']}), mounted read-write: shared by the old and the new pod")
    else:
        fail(f"the upgrade socket's directory {d} is not a read-write mount of hostPath /run/game-gateway "
             f"(DirectoryOrCreate) (mount {mount}, volume {hp})")
        return
    # The kubelet creates it root-owned 0755 and fsGroup does not apply to
    # hostPath: something must hand it to the gateway's user.
    uid = (gw.get("securityContext", {}).get("runAsUser") or pod.get("securityContext", {}).get("runAsUser"))
    chown = [c for c in pod.get("initContainers", [])
             if any(m["name"] == mount["name"] and m["mountPath"] == d for m in c.get("volumeMounts", []))
             and "CHOWN" in c.get("securityContext", {}).get("capabilities", {}).get("add", [])
             and any(str(uid) in a for a in c.get("command", []) + c.get("args", []))
             and any("chown" in a for a in c.get("command", []) + c.get("args", []))]
    if chown:
        c = chown[0]
        caps = c["securityContext"]["capabilities"]
        if caps.get("drop") == ["ALL"] and caps.get("add") == ["CHOWN"] \
                and c["securityContext"].get("allowPrivilegeEscalation") is False:
            ok(f"init container {c['name']} hands {d} to uid {uid} (CAP_CHOWN only)")
        else:
            fail(f"init container {c['name']} has more than CAP_CHOWN: {c['securityContext']}")
    else:
        fail(f"nothing makes hostPath {d} writable by uid {uid} (the kubelet creates it root-owned; fsGroup does "
             "not apply to hostPath): add an init container with CAP_CHOWN")

    check_live_upgrade_drift(pod, gw, cfg)


def _toml_diff(a, b, prefix=""):
    """Dotted keys whose values differ between two parsed TOML documents."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in _toml_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_live_upgrade_drift(pod, gw, cfg):
    """The overlay's DaemonSet and gateway.toml are copies (a StatefulSet
    cannot become a DaemonSet by patching; the gateway reads one config
    file): they must equal base's and host-network's but for the documented
    differences."""
    base = _load_doc(os.path.join(K8S, "base", "statefulset.yaml"), "StatefulSet")
    hn = _load_doc(os.path.join(K8S, "overlays", "host-network", "statefulset-host-network.yaml"), "StatefulSet")
    bpod = base["spec"]["template"]["spec"]
    bgw = next(c for c in bpod["containers"] if c["name"] == "gateway")
    drift = []
    for k in ("serviceAccountName", "automountServiceAccountToken", "enableServiceLinks",
              "terminationGracePeriodSeconds", "securityContext"):
        if pod.get(k) != bpod.get(k):
            drift.append(f"pod {k}: {pod.get(k)} != base {bpod.get(k)}")
    hpod = hn["spec"]["template"]["spec"]
    for k in ("nodeSelector", "tolerations", "dnsPolicy", "hostNetwork"):
        if pod.get(k) != hpod.get(k):
            drift.append(f"pod {k}: {pod.get(k)} != host-network {hpod.get(k)}")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    for v in bpod.get("volumes", []):
        if vols.get(v["name"]) != v:
            drift.append(f"volume {v['name']} differs from base")
    for k in ("env", "lifecycle", "securityContext"):
        if gw.get(k) != bgw.get(k):
            drift.append(f"gateway {k}: {gw.get(k)} != base {bgw.get(k)}")
    strip = lambda ps: [{k: p.get(k) for k in ("name", "containerPort", "protocol")} for p in ps]
    if strip(gw.get("ports", [])) != strip(bgw.get("ports", [])):
        drift.append(f"gateway ports {gw.get('ports')} != base {bgw.get('ports')}")
    if gw.get("args", [])[:len(bgw["args"])] != bgw["args"]:
        drift.append(f"gateway args {gw.get('args')} do not start with base's {bgw['args']}")
    for m in bgw.get("volumeMounts", []):
        if m not in gw.get("volumeMounts", []):
            drift.append(f"gateway volumeMount {m} of base missing")
    # Probes: same endpoints; timings may differ (daemonset.yaml says why).
    for probe in ("readinessProbe", "livenessProbe"):
        if gw.get(probe, {}).get("httpGet") != bgw.get(probe, {}).get("httpGet"):
            drift.append(f"gateway {probe} endpoint {gw.get(probe, {}).get('httpGet')} != base")
    with open(os.path.join(K8S, "base", "gateway.toml"), "rb") as f:
        bcfg = tomllib.load(f)
    mine = json.loads(json.dumps(cfg))
    for k in ("upgrade_socket", "after_handover"):
        mine.get("server", {}).pop(k, None)
    diff = _toml_diff(mine, bcfg)
    if diff:
        drift.append(f"gateway.toml differs from base/gateway.toml in {diff} "
                     "(only server.upgrade_socket and server.after_handover may)")
    if drift:
        for x in drift:
            fail(f"drift from base/host-network: {x}")
    else:
        ok("DaemonSet pod and gateway.toml equal base's / host-network's apart from the live-upgrade differences")


def extract(rendered, kind, name, key):
    v = cm_data(load_all(rendered), kind, name, key)
    if v is None:
        sys.exit(f"{kind}/{name} has no key {key}")
    sys.stdout.write(v)


# --- custom resources ---------------------------------------------------------
# kubernetes-validate has no schema for the Prometheus operator's kinds, so
# they are checked here against a strict subset of monitoring.coreos.com/v1:
# required fields, types, and no property the CRD does not define (for the
# fields listed; a field of the real CRD that is missing here fails too, which
# is the safe direction: add it when used).

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS,
                   "annotations": _LABELS},
    "additionalProperties": False,
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"],
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {"type": "object", "properties": {
                        "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                        "additionalProperties": False},
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer"},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION, "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                            "params": {"type": "object"}, "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"}, "tlsConfig": {"type": "object"},
                            "authorization": {"type": "object"}, "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"}, "filterRunning": {"type": "boolean"},
                        },
                        "additionalProperties": False}},
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {
                "type": "object", "required": ["groups"],
                "properties": {"groups": {"type": "array", "items": {
                    "type": "object", "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                        "partial_response_strategy": {"type": "string"}, "limit": {"type": "integer"},
                        "rules": {"type": "array", "items": {
                            "type": "object", "required": ["expr"],
                            "properties": {
                                "alert": {"type": "string"}, "record": {"type": "string"},
                                "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                                "keep_firing_for": _DURATION, "labels": _LABELS, "annotations": _LABELS,
                            },
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "additionalProperties": False}},
                    },
                    "additionalProperties": False}}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    },
}


def check_crds(paths):
    import jsonschema
    for p in paths:
        for d in load_all(p):
            schema = CRD_SCHEMAS.get(d.get("kind"))
            name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
            if schema is None:
                fail(f"{p}: {name}: no schema for this custom resource kind")
                continue
            errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path))
            if errs:
                for e in errs:
                    fail(f"{p}: {name}: {'/'.join(map(str, e.path)) or '.'}: {e.message}")
            else:
                ok(f"{name} matches the monitoring.coreos.com/v1 schema subset (strict)")


def check_alert_tests(rules_path, tests_path):
    with open(rules_path) as f:
        alerts = [r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r]
    with open(tests_path) as f:
        tests = yaml.safe_load(f)["tests"]
    firing, quiet = set(), set()
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
    for a in alerts:
        if a in firing and a in quiet:
            ok(f"{a}: tested firing and quiet")
        else:
            fail(f"{a}: no {'firing' if a not in firing else 'quiet'} test case in {tests_path}")
    for a in (firing | quiet) - set(alerts):
        fail(f"{tests_path} tests {a}, which is not in {rules_path}")


def rules_hosts(path):
    with open(path) as f:
        doc = json.load(f)
    rules = doc.get("rules", doc) if isinstance(doc, dict) else doc
    if isinstance(rules, dict):
        rules = list(rules.values())
    eps = [e for r in rules for e in r.get("endpoints", [])]
    eps += list(doc.get("realm_mapping", {}).values()) if isinstance(doc, dict) else []
    hosts = set()
    for e in eps:
        host = e.rsplit(":", 1)[0]
        if not re.fullmatch(r"[0-9.]+|\[.*\]", host):
            hosts.add(host)
    print("\n".join(sorted(hosts)))


def toml_get(path, key):
    """Print the value of a dotted KEY (nothing when absent)."""
    with open(path, "rb") as f:
        v = tomllib.load(f)
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    if v is not None:
        print(v)


def set_token_file(path, token_file):
    """Print the TOML with [admin] token_file set to TOKEN_FILE, every other
    line (and so every line number in the gateway's errors) unchanged."""
    out, section, done = [], None, False
    with open(path) as f:
        for line in f:
            m = re.match(r"^\s*\[\[?([^\]]+)\]\]?\s*(#.*)?$", line)
            if m:
                section = m.group(1).strip()
            elif section == "admin" and re.match(r"^\s*token_file\s*=", line):
                line = f"token_file = {json.dumps(token_file)}\n"
                done = True
            out.append(line)
    if not done:
        sys.exit(f"{path}: no [admin] token_file line")
    sys.stdout.write("".join(out))


# --- systemd -------------------------------------------------------------------


def check_unit(unit, config):
    with open(unit) as f:
        text = f.read()
    kv = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            kv.setdefault(k.strip(), []).append(v.strip())
    with open(config, "rb") as f:
        cfg = tomllib.load(f)
    drain = duration_seconds(cfg.get("server", {}).get("drain_timeout", "30s"))
    stop = kv.get("TimeoutStopSec", ["90s"])[-1]
    stop_s = duration_seconds(stop if re.search(r"[a-z]$", stop) else stop + "s")
    if stop_s > drain:
        ok(f"TimeoutStopSec {stop} > drain_timeout {drain:g}s")
    else:
        fail(f"TimeoutStopSec {stop} <= drain_timeout {drain:g}s: systemd would SIGKILL mid-drain")
    want = {
        "KillSignal": "SIGTERM", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    }
    for k, v in want.items():
        if v in kv.get(k, []):
            ok(f"{k}={v}")
        else:
            fail(f"{k} is {kv.get(k)}, want {v}")
    for k in ("CPUAffinity", "LimitNOFILE", "LimitMEMLOCK", "User"):
        if k in kv:
            ok(f"{k}={kv[k][-1]}")
        else:
            fail(f"no {k}")
    if any("kill -HUP $MAINPID" in v for v in kv.get("ExecReload", [])):
        ok("ExecReload sends SIGHUP to $MAINPID")
    else:
        fail("ExecReload does not send SIGHUP ($MAINPID)")
    srv, token_file = cfg.get("server", {}), cfg.get("admin", {}).get("token_file")
    admin_host = srv.get("admin_listen", "127.0.0.1:9090").rsplit(":", 1)[0].strip("[]")
    if token_file:
        if os.path.isabs(token_file):
            ok(f"[admin] token_file {token_file}")
        else:
            fail(f"[admin] token_file {token_file} is relative: the unit runs in /, use an absolute path")
    elif not (admin_host == "localhost" or admin_host.startswith("127.") or admin_host == "::1"):
        fail(f"server.admin_listen {srv.get('admin_listen')} is off loopback without [admin] token_file: the gateway refuses to start")
    cfgs = [a for v in kv.get("ExecStart", []) for a in [v.split("--config", 1)[-1].split()[0]] if "--config" in v]
    if cfgs and os.path.basename(cfgs[0]) == os.path.basename(config):
        ok(f"ExecStart reads {cfgs[0]}")
    else:
        fail(f"ExecStart --config {cfgs} does not name {os.path.basename(config)}")
    check_unit_upgrade(kv, srv)


def unit_writable_dirs(kv):
    """Directories a ProtectSystem=strict unit may write: the ones systemd
    creates for it (owned by its user) and ReadWritePaths=."""
    roots = {"RuntimeDirectory": "/run", "StateDirectory": "/var/lib", "CacheDirectory": "/var/cache",
             "LogsDirectory": "/var/log", "ConfigurationDirectory": "/etc"}
    dirs = set()
    for key, root in roots.items():
        for v in kv.get(key, []):
            dirs.update(f"{root}/{d.split(':')[0].strip('/')}" for d in v.split())
    rw = {p.lstrip("-+") for v in kv.get("ReadWritePaths", []) for p in v.split()}
    return dirs, rw


def check_unit_upgrade(kv, srv):
    """Live upgrade under systemd: SIGUSR2 re-executes the binary, the child
    takes over and becomes the main process (MAINPID=), the old one exits."""
    sock = srv.get("upgrade_socket", "")
    if not sock:
        ok("no server.upgrade_socket: live upgrade off")
        return
    if not os.path.isabs(sock):
        fail(f"server.upgrade_socket {sock!r} is not an absolute path")
        return
    # The successor is a child of the main process: systemd must take its
    # READY=1/MAINPID= (NotifyAccess=all) and must not end the unit when the
    # old main process exits first (ExitType=cgroup).
    for k, v in {"Type": "notify", "NotifyAccess": "all", "ExitType": "cgroup", "KillMode": "mixed"}.items():
        got = kv.get(k, [None])[-1]
        if got == v:
            ok(f"{k}={v} (live upgrade)")
        else:
            fail(f"{k} is {got}, want {v}: server.upgrade_socket is set (live upgrade)")
    d = os.path.dirname(sock)
    dirs, rw = unit_writable_dirs(kv)
    if d in dirs:
        ok(f"upgrade_socket {sock} is in the unit's own directory {d} (writable, owned by {kv.get('User', ['root'])[-1]})")
    elif any(d == p or d.startswith(p.rstrip("/") + "/") for p in rw):
        ok(f"upgrade_socket {sock} is under ReadWritePaths= (the directory must be writable by the unit's user)")
    else:
        fail(f"upgrade_socket directory {d} is not writable by the unit: make it the RuntimeDirectory= "
             f"(/run/<name>) or list it in ReadWritePaths=")
    if srv.get("after_handover", "exit") != "exit":
        fail(f"server.after_handover = {srv.get('after_handover')!r} under systemd: the old process would stay "
             "in the unit, idle, until it stops; use \"exit\" (\"wait\" is for Kubernetes)")
    else:
        ok("after_handover = exit: the old process leaves the unit once it has handed over")
    fam = " ".join(kv.get("RestrictAddressFamilies", []))
    if fam and "AF_UNIX" not in fam.split():
        fail("RestrictAddressFamilies lacks AF_UNIX: the upgrade socket and sd_notify need it")
    for v in kv.get("SystemCallFilter", []):
        if v.startswith("~") and set(v[1:].split()) & {"@process", "execve", "close_range", "@basic-io", "clone", "fork"}:
            fail(f"SystemCallFilter={v} denies what the SIGUSR2 re-execution needs (fork/execve/close_range)")
    if any("--takeover" in v for v in kv.get("ExecStart", [])):
        fail("ExecStart carries --takeover: SIGUSR2 adds it itself; a restart must start fresh")


# --- metric names ---------------------------------------------------------------


METRIC_RE = re.compile(r"\b(game_gateway_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(paths):
    names = set()
    for p in paths:
        with open(p) as f:
            text = f.read()
        exprs = []
        if p.endswith(".json"):
            def walk(o):
                if isinstance(o, dict):
                    for k, v in o.items():
                        if k in ("expr", "definition") and isinstance(v, str):
                            exprs.append(v)
                        elif k == "query" and isinstance(v, str):
                            exprs.append(v)
                        else:
                            walk(v)
                elif isinstance(o, list):
                    for v in o:
                        walk(v)
            walk(json.loads(text))
        else:
            for g in yaml.safe_load(text)["groups"]:
                exprs += [r["expr"] for r in g["rules"]]
        for e in exprs:
            for n in METRIC_RE.findall(e):
                for s in SUFFIXES:
                    if n.endswith(s):
                        n = n[: -len(s)]
                names.add(n)
    print("\n".join(sorted(names)))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "gen-prometheusrule":
        gen_prometheusrule()
    elif cmd == "check-prometheusrule":
        check_prometheusrule(args or [PROMRULE])
    elif cmd == "split":
        split(*args)
    elif cmd == "check-rendered":
        check_rendered(*args)
    elif cmd == "extract":
        extract(*args)
    elif cmd == "check-unit":
        check_unit(*args)
    elif cmd == "check-alert-tests":
        check_alert_tests(*args)
    elif cmd == "rules-hosts":
        rules_hosts(*args)
    elif cmd == "toml-get":
        toml_get(*args)
    elif cmd == "set-token-file":
        set_token_file(*args)
    elif cmd == "check-crds":
        check_crds(args)
    elif cmd == "metric-names":
        metric_names(args)
    else:
        sys.exit(__doc__)
    done()


if __name__ == "__main__":
    main()
