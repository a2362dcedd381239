"""The real operator under exactly the RBAC the chart renders, as a user runs it
after `helm install`: the test API server enforces the rendered ClusterRole and
Roles the way kube-apiserver does (a server-side apply that creates an object
needs `create`), with the chart's CRD installed. An endpoint must become a
running relay with its four objects; and under the rules of a chart that
granted only `patch`, the operator is refused as on a real cluster."""

import json

import pytest
import requests
import yaml

from harness import start_apiserver, start_operator, stop, wait_for

RELEASE_NS = "botrelay"
NS = "shop"
ENDPOINTS = f"/apis/botrelay.dev/v1alpha1/namespaces/{NS}/messagingendpoints"


def roles_of(objs) -> list:
    return objs.kinds("ClusterRole") + objs.kinds("Role")


def crd_json(chart_dir, tmp):
    crd = next(d for d in yaml.safe_load_all((chart_dir / "crds" / "messagingendpoints.botrelay.dev.yaml").read_text()) if d)
    path = tmp / "crd.json"
    path.write_text(json.dumps(crd))
    return path


def run_operator(repo, chart_dir, tmp, roles, env=None):
    """Starts the API server enforcing `roles` and the operator (with the
    chart's `env`); creates one endpoint. Returns (processes, url, operator log)."""
    for name in ("botrelay-operator", "botrelay-test-apiserver"):
        assert (repo / "target" / "debug" / name).exists(), f"build {name} first (tests/run does)"
    (tmp / "roles.json").write_text(json.dumps(roles))
    apiserver, url, kubeconfig = start_apiserver(
        repo / "target" / "debug" / "botrelay-test-apiserver", tmp, RELEASE_NS,
        "--rbac", str(tmp / "roles.json"), "--crd", str(crd_json(chart_dir, tmp)))
    processes = [apiserver]
    log = tmp / "operator.log"
    try:
        operator, _ = start_operator(repo / "target" / "debug" / "botrelay-operator", kubeconfig, log,
                                     lease_namespace=RELEASE_NS, extra_env=env)
        processes.append(operator)
        body = {"apiVersion": "botrelay.dev/v1alpha1", "kind": "MessagingEndpoint",
                "metadata": {"name": "support", "namespace": NS},
                "spec": {"bot": {"url": "http://support-bot.shop.svc:8080/events"},
                         "responseEndpoint": {"url": "https://backend.example/bot-responses"}}}
        r = requests.post(url + ENDPOINTS, json=body, timeout=10)
        assert r.status_code == 201, r.text
    except BaseException:
        stop(processes)
        raise
    return processes, url, log


def ready(url):
    r = requests.get(f"{url}{ENDPOINTS}/support", timeout=10)
    assert r.status_code == 200, r.text
    conditions = r.json().get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), None)


@pytest.mark.parametrize("sets", [(), (f"operator.watchNamespaces={{{NS}}}",)], ids=["cluster", "namespaced"])
def test_the_operator_makes_a_relay_under_exactly_the_charts_rbac(render, repo, chart_dir, tmp_path, sets):
    objs = render(*sets)
    # The settings the chart gives the operator (the namespaces it watches among them).
    container = objs.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])
           if "value" in e and e["name"].startswith("BOTRELAY_WATCH")}
    processes, url, log = run_operator(repo, chart_dir, tmp_path, roles_of(objs), env)
    try:
        condition = wait_for("the endpoint to be Ready", lambda: (c := ready(url)) and c["reason"] == "RelayReady" and c,
                             timeout=30)
        assert condition["status"] == "True"
        for path in (f"/api/v1/namespaces/{NS}/secrets/support-credentials",
                     f"/apis/apps/v1/namespaces/{NS}/deployments/support-relay",
                     f"/api/v1/namespaces/{NS}/services/support-relay",
                     f"/api/v1/namespaces/{NS}/persistentvolumeclaims/support-data"):
            r = requests.get(url + path, timeout=10)
            assert r.status_code == 200, f"{path}: {r.text}"
    except AssertionError as e:
        raise AssertionError(f"{e}; operator log:\n{log.read_text()[-3000:]}") from None
    finally:
        stop(processes)
    assert "forbidden" not in log.read_text().lower(), log.read_text()[-3000:]


def test_a_patch_only_role_is_refused_as_a_real_cluster_refuses_it(render, repo, chart_dir, tmp_path):
    roles = roles_of(render())
    for role in roles:
        for rule in role["rules"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create" or "leases" in rule["resources"]
                             or "events" in rule["resources"]]
    processes, url, log = run_operator(repo, chart_dir, tmp_path, roles)
    try:
        condition = wait_for("the endpoint to report the refusal",
                             lambda: (c := ready(url)) and c["reason"] == "ApplyFailed" and c, timeout=30)
    finally:
        stop(processes)
    assert condition["status"] == "False"
    assert ('secrets "support-credentials" is forbidden: User "system:serviceaccount:botrelay:botrelay-operator" '
            'cannot create resource "secrets" in API group "" in the namespace "shop"') in condition["message"], condition
