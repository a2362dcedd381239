"""The Helm chart, as a platform engineer would check it before installing:
lint, render with default values and with every toggle on, and read what would
be applied: images, probes, security context, least-privilege RBAC (against the
calls the operator really makes), the CRD, the monitors, the alerts and the
dashboard."""

import json
import re
import shutil
import subprocess
import textwrap

import jsonschema
import kubernetes_validate
import pytest
import yaml

# What the operator puts on every relay pod (DESIGN.md, the team's contract).
RELAY_POD_LABELS = {
    "app.kubernetes.io/name": "botrelay-relay",
    "app.kubernetes.io/instance": "support",
    "app.kubernetes.io/component": "relay",
    "app.kubernetes.io/part-of": "botrelay",
    "app.kubernetes.io/managed-by": "botrelay-operator",
    "botrelay.dev/endpoint": "support",
}

MONITORING_ON = ("monitoring.enabled=true",)

# Every toggle and optional field of values.yaml set at once.
ALL_ON = {
    "operator": {
        "replicaCount": 2,
        "image": {"repository": "registry.example/botrelay/operator", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "debug",
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "platform"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                "matchLabels": {"app.kubernetes.io/name": "botrelay-operator"}}}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "botrelay-operator"}}}],
        "priorityClassName": "system-cluster-critical",
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
    },
    "relay": {"image": {"repository": "registry.example/botrelay/relay", "tag": "dev"}},
    "serviceAccount": {"annotations": {"example.com/role": "x"}},
    "monitoring": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "alerts": {"labels": {"team": "platform"}, "deliveryFailureRatio": 0.2, "oldestPendingSeconds": 600},
        "dashboard": {"namespace": "grafana", "labels": {"extra": "yes"}, "annotations": {"grafana_folder": "Bots"}},
    },
}


def chart_meta(chart_dir):
    return yaml.safe_load((chart_dir / "Chart.yaml").read_text())


def operator_container(objs):
    dep = objs.one("Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def granted(objs):
    """(verb, group, resource) triples the chart's (Cluster)Roles grant."""
    out = set()
    for role in objs.kinds("ClusterRole") + objs.kinds("Role"):
        for rule in role.get("rules", []):
            for g in rule.get("apiGroups", []):
                for r in rule.get("resources", []):
                    for v in rule.get("verbs", []):
                        out.add((v, g, r))
    return out


def selects(selector_labels: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector_labels.items())


# --- lint and render --------------------------------------------------------


@pytest.mark.parametrize("sets", [(), MONITORING_ON, ("operator.watchNamespaces={shop,support}",) + MONITORING_ON],
                         ids=["defaults", "monitoring", "watch-namespaces"])
def test_helm_lint_is_clean(helm, chart_dir, sets):
    cmd = [helm, "lint", "--strict", str(chart_dir)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_lint_with_every_toggle_on(helm, chart_dir, tmp_path):
    values = tmp_path / "all-on.yaml"
    values.write_text(yaml.safe_dump(ALL_ON))
    out = subprocess.run([helm, "lint", "--strict", str(chart_dir), "-f", str(values)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_chart_version_and_app_version(chart_dir):
    meta = chart_meta(chart_dir)
    assert meta["apiVersion"] == "v2"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"


def test_defaults_render_the_operator_and_no_monitoring(render):
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted([
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
    ]), kinds
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"):
        assert not objs.kinds(kind), f"{kind} rendered although monitoring is off by default"


def test_every_toggle_on_renders_every_object(render):
    objs = render(values=ALL_ON)
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap", "Deployment", "Service",
                 "ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        assert objs.kinds(kind), f"no {kind} with every toggle on"
    for o in objs.kinds("PodMonitor") + objs.kinds("ServiceMonitor") + objs.kinds("PrometheusRule") + objs.kinds("ConfigMap"):
        assert o["metadata"]["labels"]["release"] == "kube-prometheus-stack", o["metadata"]["name"]
    spec = objs.one("Deployment")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == ALL_ON["operator"]["nodeSelector"]
    assert spec["tolerations"] == ALL_ON["operator"]["tolerations"]
    assert spec["affinity"] == ALL_ON["operator"]["affinity"]
    assert spec["topologySpreadConstraints"] == ALL_ON["operator"]["topologySpreadConstraints"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    container = spec["containers"][0]
    assert container["image"] == "registry.example/botrelay/operator:dev"
    assert container["imagePullPolicy"] == "Always"
    env = env_of(container)
    assert env["BOTRELAY_RELAY_IMAGE"]["value"] == "registry.example/botrelay/relay:dev"
    assert env["BOTRELAY_LOG_LEVEL"]["value"] == "debug"
    assert env["RUST_BACKTRACE"]["value"] == "1"
    assert objs.one("Deployment")["spec"]["replicas"] == 2


@pytest.mark.parametrize("individually_off", ["relays", "operator", "alerts", "dashboard"])
def test_each_monitoring_object_has_its_own_switch(render, individually_off):
    kind = {"relays": "PodMonitor", "operator": "ServiceMonitor", "alerts": "PrometheusRule",
            "dashboard": "ConfigMap"}[individually_off]
    objs = render("monitoring.enabled=true", f"monitoring.{individually_off}.enabled=false")
    assert not objs.kinds(kind)
    others = {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"} - {kind}
    assert all(objs.kinds(k) for k in others)


# --- the operator Deployment ------------------------------------------------


def test_default_images_are_the_projects_at_app_version(render, chart_dir):
    app_version = chart_meta(chart_dir)["appVersion"]
    container = operator_container(render())
    assert container["image"] == f"botrelay/operator:{app_version}"
    assert env_of(container)["BOTRELAY_RELAY_IMAGE"]["value"] == f"botrelay/relay:{app_version}"


def test_operator_gets_its_configuration(render):
    objs = render()
    container = operator_container(objs)
    env = env_of(container)
    assert env["BOTRELAY_LOG_LEVEL"]["value"] == "info"
    assert env["BOTRELAY_LEADER_ELECTION"]["value"] == "true"
    assert "BOTRELAY_WATCH_NAMESPACES" not in env, "empty means all namespaces: the variable is left out"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["BOTRELAY_LEASE_NAME"]["value"] == "botrelay-operator"
    # The admin server listens where the probes and the Service look.
    port = int(env["BOTRELAY_ADMIN_LISTEN"]["value"].rsplit(":", 1)[1])
    (admin,) = [p for p in container["ports"] if p["name"] == "admin"]
    assert admin["containerPort"] == port
    pod = objs.one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == objs.one("ServiceAccount")["metadata"]["name"]


def test_operator_runs_non_root_with_a_read_only_root_filesystem(render):
    dep = render().one("Deployment")
    pod_sc = dep["spec"]["template"]["spec"]["securityContext"]
    sc = operator_container(render())["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert not sc.get("privileged")


def test_operator_probes_hit_the_admin_server(render):
    container = operator_container(render())
    port_names = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


def test_metrics_service_selects_the_operator_pods(render):
    objs = render()
    svc = objs.one("Service")
    pod_labels = objs.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], pod_labels)
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "metrics"
    assert port["targetPort"] in {p["name"] for p in operator_container(objs)["ports"]}
    # The Deployment's selector matches its own pods, and only stable labels.
    selector = objs.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels)
    assert "app.kubernetes.io/version" not in selector and "helm.sh/chart" not in selector


# --- RBAC -------------------------------------------------------------------


@pytest.mark.parametrize("sets", [(), ("operator.watchNamespaces={shop,support}",)], ids=["cluster", "namespaced"])
def test_rbac_has_no_wildcards(render, sets):
    objs = render(*sets)
    roles = objs.kinds("ClusterRole") + objs.kinds("Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"wildcard {key} in {role['kind']} {role['metadata']['name']}"
            assert "nonResourceURLs" not in rule


def test_rbac_grants_exactly_the_calls_the_operator_makes(render, repo):
    observed_file = repo / "target" / "rbac-observed.json"
    assert observed_file.exists(), (
        f"{observed_file} is missing: the operator's integration test writes the API calls the real operator "
        "made (cargo test -p botrelay-operator); without it the chart's RBAC cannot be checked"
    )
    observed = {(c["verb"], c["group"], c["resource"]) for c in json.loads(observed_file.read_text())}
    assert observed, f"{observed_file} lists no call"
    grants = granted(render())
    missing = sorted(observed - grants)
    unused = sorted(grants - observed)
    assert not missing, f"the operator makes calls the chart does not grant: {missing}"
    assert not unused, f"the chart grants what the operator never uses: {unused}"


def test_cluster_wide_rbac_binds_the_operator_service_account(render):
    objs = render()
    sa = objs.one("ServiceAccount")["metadata"]
    crb = objs.one("ClusterRoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                              "name": objs.one("ClusterRole")["metadata"]["name"]}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    # Leader election: the Lease only, only in the release namespace.
    lease_role = objs.one("Role")
    assert lease_role["metadata"]["namespace"] == "botrelay"
    assert {r for rule in lease_role["rules"] for r in rule["resources"]} == {"leases"}
    rb = objs.one("RoleBinding")
    assert rb["roleRef"]["name"] == lease_role["metadata"]["name"]
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    # Secrets are never readable through the lease role, nor deletable anywhere.
    assert ("delete", "", "secrets") not in granted(objs)


def test_watching_namespaces_grants_rights_only_there(render):
    objs = render("operator.watchNamespaces={shop,support}", "monitoring.enabled=true")
    assert not objs.kinds("ClusterRole") and not objs.kinds("ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in objs.kinds("Role")}
    assert ("shop", "botrelay-operator") in roles and ("support", "botrelay-operator") in roles
    assert ("botrelay", "botrelay-operator-leader-election") in roles
    for rb in objs.kinds("RoleBinding"):
        assert (rb["metadata"]["namespace"], rb["roleRef"]["name"]) in roles
        assert rb["subjects"][0]["namespace"] == "botrelay"
    # The per-namespace roles grant what the ClusterRole grants cluster-wide.
    cluster_rules = render().one("ClusterRole")["rules"]
    for ns in ("shop", "support"):
        (role,) = [r for r in objs.kinds("Role") if r["metadata"]["namespace"] == ns]
        assert role["rules"] == cluster_rules
    env = env_of(operator_container(objs))
    assert env["BOTRELAY_WATCH_NAMESPACES"]["value"] == "shop,support"
    assert objs.one("PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["shop", "support"]}


def test_leader_election_off_drops_the_lease_role(render):
    objs = render("operator.leaderElection.enabled=false")
    assert env_of(operator_container(objs))["BOTRELAY_LEADER_ELECTION"]["value"] == "false"
    assert not objs.kinds("Role") and not objs.kinds("RoleBinding")


def test_rbac_and_service_account_can_be_brought_by_the_user(render):
    objs = render("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=my-operator")
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"):
        assert not objs.kinds(kind)
    assert objs.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "my-operator"


# --- the CRD ----------------------------------------------------------------


def test_chart_crd_is_identical_to_the_generated_crd(repo, chart_dir):
    generated = repo / "crds" / "messagingendpoints.botrelay.dev.yaml"
    shipped = chart_dir / "crds" / "messagingendpoints.botrelay.dev.yaml"
    assert generated.exists(), f"{generated} is missing (generated by the operator's crdgen)"
    assert shipped.exists(), f"{shipped} is missing: copy {generated} into the chart"
    assert shipped.read_bytes() == generated.read_bytes(), (
        f"{shipped} differs from {generated}: copy it again (cp {generated.relative_to(repo)} "
        f"{shipped.relative_to(repo)})"
    )
    assert sorted(p.name for p in (chart_dir / "crds").iterdir()) == [shipped.name]


def test_crd_is_installed_by_helm(render, repo):
    if not (repo / "charts" / "botrelay" / "crds" / "messagingendpoints.botrelay.dev.yaml").exists():
        pytest.fail("the chart ships no CRD")
    crd = render(extra=("--include-crds",)).one("CustomResourceDefinition")
    assert crd["metadata"]["name"] == "messagingendpoints.botrelay.dev"
    assert crd["spec"]["group"] == "botrelay.dev"
    assert crd["spec"]["names"]["kind"] == "MessagingEndpoint"
    assert crd["spec"]["scope"] == "Namespaced"


# --- monitoring -------------------------------------------------------------


def test_relay_pod_monitor_selects_relay_pods_in_every_namespace(render):
    pm = render(*MONITORING_ON).one("PodMonitor")
    spec = pm["spec"]
    assert selects(spec["selector"]["matchLabels"], RELAY_POD_LABELS)
    assert not selects(spec["selector"]["matchLabels"], {**RELAY_POD_LABELS, "app.kubernetes.io/name": "botrelay-operator"})
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    (ep,) = spec["podMetricsEndpoints"]
    assert ep["port"] == "metrics"
    assert ep["path"] == "/metrics"
    # The relays' own `endpoint` label must win over prometheus-operator's
    # target label of the same name (the port name).
    assert ep["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_botrelay_dev_endpoint"], "targetLabel": "endpoint",
            "action": "replace"} in ep["relabelings"]


def test_operator_service_monitor_selects_the_metrics_service(render):
    objs = render(*MONITORING_ON)
    sm = objs.one("ServiceMonitor")
    svc = objs.one("Service")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [svc["metadata"]["namespace"]]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    # jobLabel makes job="botrelay-operator", which the operator alerts select.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "botrelay-operator"
    # botrelay_operator_relay_pods names each endpoint by its own labels
    # namespace and endpoint; prometheus-operator's target labels of the same
    # names (the operator's namespace, the port name) must not win over them,
    # or BotrelayRelayPodsDown and the relay pods panel see one endpoint.
    assert ep.get("honorLabels") is True, ep


def rule_groups(objs):
    return objs.one("PrometheusRule")["spec"]["groups"]


def test_alerts_pass_promtool(render, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (.ci/run does)"
    for name, objs in {"defaults": render(*MONITORING_ON), "all-on": render(values=ALL_ON)}.items():
        rules = tmp_path / f"{name}.rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": rule_groups(objs)}))
        out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_cover_what_on_call_needs(render):
    alerts = {r["alert"]: r for g in rule_groups(render(values=ALL_ON)) for r in g["rules"]}
    assert {"BotrelayRelayDown", "BotrelayDeliveriesFailing", "BotrelayDeadLettersGrowing",
            "BotrelayOldestPendingTooOld", "BotrelayRejectingMessages",
            "BotrelayDedupeTableFull", "BotrelayBotAnswersUnreadable", "BotrelayRelayPodsDown",
            "BotrelayReconcileErrors", "BotrelayTargetCircuitOpen", "BotrelayTargetPausedByHand",
            "BotrelayTargetUnreachable"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["labels"]["team"] == "platform", name
        assert rule["annotations"]["summary"].strip(), name
        # Runbook-style: what is wrong, and what to check.
        assert len(rule["annotations"]["description"]) > 150, name
        assert "kubectl" in rule["annotations"]["description"] or "dashboard" in rule["annotations"]["description"], name
    assert "> 0.2" in alerts["BotrelayDeliveriesFailing"]["expr"]
    assert "> 600" in alerts["BotrelayOldestPendingTooOld"]["expr"]
    # Several relay pods per endpoint: desired and ready compared endpoint by endpoint.
    pods_down = " ".join(alerts["BotrelayRelayPodsDown"]["expr"].split())
    assert 'state="desired"' in pods_down and 'state="ready"' in pods_down, pods_down
    assert "on (namespace, endpoint)" in pods_down, pods_down
    assert alerts["BotrelayRelayPodsDown"]["for"] == "10m"


def test_dashboard_config_map_holds_the_dashboard(render, chart_dir):
    objs = render(values=ALL_ON)
    cm = objs.one("ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Bots"}
    (key,) = cm["data"]
    assert key.endswith(".json")
    dashboard = json.loads(cm["data"][key])
    assert dashboard == json.loads((chart_dir / "dashboards" / "botrelay.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables["namespace"]["query"]["query"]
    assert "endpoint" in variables["endpoint"]["query"]["query"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            if "botrelay_operator_" not in t["expr"]:
                assert 'namespace=~"$namespace"' in t["expr"] and 'endpoint=~"$endpoint"' in t["expr"], t["expr"]


# --- values.schema.json -----------------------------------------------------


@pytest.mark.parametrize("bad_set, field", [
    ("operator.replicaCount=two", "replicaCount"),
    ("operator.logLevel=loud", "logLevel"),
    ("operator.leaderElection.enabled=maybe", "enabled"),
    ("operator.replicas=2", "replicas"),
    ("monitoring.enabled=yes", "enabled"),
    ("monitoring.relays.interval=30", "interval"),
    ("operator.watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
    ("operator.image.pullPolicy=Sometimes", "pullPolicy"),
    ("monitoring.alerts.deliveryFailureRatio=2", "deliveryFailureRatio"),
])
def test_schema_rejects_a_wrong_value_naming_it(helm, chart_dir, bad_set, field):
    out = subprocess.run([helm, "template", "botrelay", str(chart_dir), "--set", bad_set],
                         capture_output=True, text=True)
    assert out.returncode != 0, f"{bad_set} was accepted"
    assert field in out.stderr, out.stderr


def test_values_file_documents_every_value(chart_dir):
    """Every value of values.yaml has a comment right above it, or sits in a
    block (resources, probes, security contexts) whose key has one."""
    lines = (chart_dir / "values.yaml").read_text().splitlines()

    def indent(line):
        return len(line) - len(line.lstrip())

    def documented(i):
        if i > 0 and lines[i - 1].strip().startswith("#"):
            return True
        parents = [j for j in range(i - 1, -1, -1)
                   if lines[j].strip() and not lines[j].strip().startswith("#") and indent(lines[j]) < indent(lines[i])]
        return bool(parents) and documented(parents[0])

    undocumented = [line.strip() for i, line in enumerate(lines)
                    if line.strip() and not line.strip().startswith("#") and not documented(i)
                    and not line.rstrip().endswith(":")]
    assert not undocumented, f"values without a comment: {undocumented}"


def test_dashboard_panels_fit_the_grid_without_overlapping(chart_dir):
    panels = json.loads((chart_dir / "dashboards" / "botrelay.json").read_text())["panels"]
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


# --- against the Kubernetes API schemas -----------------------------------------

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
MONITORING_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}  # prometheus-operator CRDs: checked above


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON, {"operator": {"watchNamespaces": ["shop", "support"]}}],
                         ids=["defaults", "all-on", "watch-namespaces"])
def test_rendered_objects_match_the_kubernetes_api_schemas(render, kube_version, values):
    """Strict: a misspelt field (say runAsNonroot) or a wrong type fails here,
    where a real API server would reject or silently drop it."""
    objs = render(values=values, extra=("--include-crds",))
    checked = 0
    for obj in objs:
        if obj["kind"] in MONITORING_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {kube_version}: {e.message}")
        checked += 1
    assert checked >= 7


def crd_schema(chart_dir):
    crd = yaml.safe_load((chart_dir / "crds" / "messagingendpoints.botrelay.dev.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return crd["spec"]["group"] + "/" + version["name"], version["schema"]["openAPIV3Schema"]


def heredoc_yaml(text: str) -> list:
    """The YAML documents between `<<'YAML'` and `YAML` in a shell snippet."""
    blocks = re.findall(r"<<'YAML'[^\n]*\n(.*?)\n\s*YAML\n", text, flags=re.S)
    assert blocks, "no example MessagingEndpoint found"
    return [yaml.safe_load(textwrap.dedent(b)) for b in blocks]


def test_readme_and_notes_examples_are_valid_messaging_endpoints(helm4, chart_dir):
    # Helm 3's install --dry-run=client still asks a cluster for its version:
    # NOTES.txt is read with Helm 4 only.
    api_version, schema = crd_schema(chart_dir)
    notes = subprocess.run([helm4, "install", "botrelay", str(chart_dir), "-n", "botrelay", "--dry-run=client"],
                           check=True, capture_output=True, text=True).stdout
    examples = heredoc_yaml(notes.split("NOTES:", 1)[1]) + heredoc_yaml((chart_dir / "README.md").read_text())
    assert len(examples) == 2, examples
    for example in examples:
        assert example["apiVersion"] == api_version
        assert example["kind"] == "MessagingEndpoint"
        jsonschema.validate(example["spec"], schema["properties"]["spec"])
    # The check can fail: a misspelt field is refused by the CRD's schema.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"bot": {"url": 42}}, schema["properties"]["spec"])
