"""The Grafana dashboard and the alerts against a real Prometheus.

The test starts the real relay (target/debug/botrelay) on loopback with a bot
and a response endpoint that are HTTP servers in this process, twice for one
endpoint (two relay pods of an endpoint with replicas: 2, each its own scrape
target with its own series, as with storage.type nats), drives traffic through
both that has every kind of outcome (accepted, duplicate, invalid,
unauthorized, too large, unknown conversation; deliveries that succeed, fail
once and are retried, or fail until they are dead-lettered; one delivery held
open on each relay so that the queues are not empty), and has Debian's Prometheus scrape it
with tests/dashboard/prometheus.yml and load the chart's alert rules. Then every
query of every panel is evaluated through Prometheus's HTTP API, with the
dashboard's variables set as Grafana would: each must be valid PromQL and
return data, and each must add up the two relay pods of the endpoint (sum) or
take the larger (max for ages), never show them apart.

The operator's panels read the real operator (target/debug/botrelay-operator,
leader election on), run through a kubeconfig against the test API server
(target/debug/botrelay-test-apiserver). The test creates MessagingEndpoints
through that server's HTTP API, as kubectl would: two valid ones, which become
Ready (the test server plays the Deployment controller; the relays' endpoint
asks for two pods on the nats store), one that asks for two relay pods whose
NATS credentials Secret is missing, so none can be ready (the operator says
SecretNotFound and BotrelayRelayPodsDown becomes pending), and one that does
not match the CRD's schema (a real API server would refuse it; the test server
stores it on purpose), which the operator fails to reconcile with reason
undecodable_object and counts as not ready. Prometheus scrapes the operator's
/metrics as the chart's ServiceMonitor would (with its honorLabels).

The values Prometheus returned are written to target/dashboard-query-results.json,
the alerts' states and values to target/dashboard-alert-states.json.
"""

import base64
import http.server
import itertools
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest
import requests
import yaml

from harness import start_apiserver, start_operator, stop, wait_for

HERE = pathlib.Path(__file__).resolve().parent
NAMESPACE = "botrelay-test"
ENDPOINT = "support"
RELAY_PODS = (f"{ENDPOINT}-relay-0", f"{ENDPOINT}-relay-1")
# Where the nats store would be; the operator only writes it into the relay
# Deployment (the relays of this test run on their own stores).
NATS = {"type": "nats", "nats": {"urls": ["nats://127.0.0.1:4222"]}}
CLIENT_TOKEN = "client-" + secrets.token_hex(8)
BOT_TOKEN = "bot-" + secrets.token_hex(8)
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval stands for in the test


_next_port = itertools.count(10_000 + (os.getpid() % 200) * 100)


def free_port() -> int:
    """A port free a moment ago, below Linux's ephemeral range (32768 and up) so
    that no outgoing connection can take it before the process that binds it."""
    for _ in range(22_000):
        port = 10_000 + (next(_next_port) - 10_000) % 22_000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# --- the bot and the response endpoint ----------------------------------------


class Receivers:
    """Behaviour of the bot and the response endpoint, chosen by the message text:
    ok, fail-once (500 then 200), fail-always (500 until dead-lettered),
    reply-flaky / reply-reject (the bot's reply then gets 503 once / always at
    the response endpoint), hold (the bot answers only when the test releases it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen = {}
        self.release = threading.Event()
        self.bot_requests = 0
        self.response_requests = 0

    def first_time(self, key) -> bool:
        with self.lock:
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            return n == 0

    def bot(self, body: dict):
        with self.lock:
            self.bot_requests += 1
        text = body.get("text", "")
        if text == "fail-always":
            return 500, {"error": "bot is broken"}
        if text == "fail-once" and self.first_time(("bot", body["tags"]["messageId"])):
            return 500, {"error": "bot hiccup"}
        if text == "hold":
            self.release.wait(60)
        reply = {"reply-flaky": "flaky", "reply-reject": "reject"}.get(text, "echo")
        return 200, {"responses": [{"type": "text", "payload": {"text": reply}}]}

    def response(self, body: dict, headers):
        with self.lock:
            self.response_requests += 1
        text = (body.get("payload") or {}).get("text", "")
        if text == "reject":
            return 503, {"error": "back-end down"}
        if text == "flaky" and self.first_time(("response", headers.get("webhook-id"))):
            return 503, {"error": "back-end busy"}
        return 200, {}


def serve(handler_fn) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            status, answer = handler_fn(body, self.headers)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


# --- the operator and its API server --------------------------------------------


class ApiServer:
    """The test API server's HTTP API, used as kubectl would use a real one."""

    ENDPOINTS = f"/apis/botrelay.dev/v1alpha1/namespaces/{NAMESPACE}/messagingendpoints"

    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()

    def create_endpoint(self, name: str, spec: dict) -> dict:
        body = {"apiVersion": "botrelay.dev/v1alpha1", "kind": "MessagingEndpoint",
                "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}
        r = self.http.post(self.url + self.ENDPOINTS, json=body, timeout=10)
        assert r.status_code == 201, r.text
        return r.json()

    def patch_endpoint(self, name: str, patch: dict) -> dict:
        r = self.http.patch(f"{self.url}{self.ENDPOINTS}/{name}", data=json.dumps(patch), timeout=10,
                            headers={"Content-Type": "application/merge-patch+json"})
        assert r.status_code == 200, r.text
        return r.json()

    def ready_reason(self, name: str) -> str | None:
        """The reason of the endpoint's Ready condition (what kubectl get mep -o wide shows)."""
        r = self.http.get(f"{self.url}{self.ENDPOINTS}/{name}", timeout=10)
        assert r.status_code == 200, r.text
        conditions = r.json().get("status", {}).get("conditions", [])
        return next((c["reason"] for c in conditions if c["type"] == "Ready"), None)


# --- the relay's traffic ------------------------------------------------------


class Client:
    def __init__(self, base: str):
        self.base = base
        self.http = requests.Session()

    def send(self, text, message_id=None, conversation=None, token=CLIENT_TOKEN, path="/v1/messages", **override):
        body = {"userId": "user-1", "messageId": message_id or str(uuid.uuid4()),
                "conversationId": conversation or f"conv-{uuid.uuid4()}", "type": "text", "text": text}
        body.update(override)
        body = {k: v for k, v in body.items() if v is not None}
        return self.http.post(self.base + path, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def drive_traffic(client: Client, hold: bool):
    """One round of every kind of request; asserts the relay answers as the
    contract says, so that the metrics mean what the test thinks they mean."""
    ok = [client.send("hello") for _ in range(5)]
    assert all(r.status_code == 200 for r in ok), [r.text for r in ok]
    first = ok[0].json()
    # Same messageId again: a duplicate, answered like the first time.
    dup = client.send("hello", message_id=first["message"]["tags"]["id"],
                      conversation=first["conversation"]["tags"]["id"])
    assert dup.status_code == 200, dup.text
    assert client.send("hello", path="/").status_code == 200
    for text in ("fail-once", "fail-always", "reply-flaky", "reply-reject"):
        r = client.send(text)
        assert r.status_code == 200, r.text
    if hold:
        assert client.send("hold").status_code == 200
    assert client.send("hello", token="wrong-token").status_code == 401
    assert client.send("hello", userId=None).status_code == 400
    # On the pooled connection: the relay reads a body this far over the limit
    # to its end before answering 413, so the connection goes on.
    too_large = client.http.post(client.base + "/v1/messages", timeout=10,
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
                                 json={"userId": "u", "messageId": str(uuid.uuid4()), "conversationId": "c",
                                       "type": "text", "text": "x" * (300 * 1024)})
    assert too_large.status_code == 413, too_large.text
    assert client.http.post(client.base + "/no/such/path", json={}, timeout=10).status_code == 404
    # The bot's own asynchronous replies: one to a known conversation, one not.
    bot_auth = {"Authorization": f"Bearer {BOT_TOKEN}"}
    r = client.http.post(client.base + "/v1/bot/messages", headers=bot_auth, timeout=10,
                         json={"conversationId": first["conversation"]["id"], "type": "text",
                               "payload": {"text": "async hello"}})
    assert r.status_code == 202, r.text
    r = client.http.post(client.base + "/v1/bot/messages", headers=bot_auth, timeout=10,
                         json={"conversationId": "no-such-conversation", "type": "text",
                               "payload": {"text": "lost"}})
    assert r.status_code == 404, r.text


def scraped(admin: str, name: str, **labels) -> float:
    """The sum of the samples of `name` with `labels` on a /metrics page."""
    text = requests.get(f"http://{admin}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- Prometheus -----------------------------------------------------------------


class Prometheus:
    def __init__(self, base: str):
        self.base = base
        self.relay_admins = []  # the admin addresses of the endpoint's relay pods, in RELAY_PODS order

    def api(self, path, **params):
        r = requests.get(self.base + "/api/v1/" + path, params=params, timeout=10)
        body = r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None):
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]


def start_relay(relay_bin, args, log_path, tries=5):
    """Start the relay on free loopback ports; (process, api, admin).

    A port found free can be taken by another process before the relay binds
    it (other test suites run on this machine too). The relay then exits, and
    the port may even answer for someone else's server; so a start counts only
    when our process is still alive and its API port accepts our token (a body
    that breaks a rule gets a 400 from our relay, a 401 from any other)."""
    for _ in range(tries):
        api, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        log = open(log_path, "a")
        proc = subprocess.Popen([str(relay_bin), "--listen", api, "--admin-listen", admin, *args],
                                stdout=log, stderr=subprocess.STDOUT)

        def ready():
            assert proc.poll() is None, f"relay exited with {proc.returncode}"
            return requests.get(f"http://{admin}/readyz", timeout=1).ok

        try:
            wait_for("the relay to be ready", ready, timeout=20)
            time.sleep(0.3)
            ours = requests.post(f"http://{api}/v1/messages", json={"probe": True}, timeout=5,
                                 headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
            if proc.poll() is None and ours.status_code == 400:
                return proc, api, admin
        except (AssertionError, requests.RequestException):
            pass
        proc.kill()
        proc.wait()
    raise AssertionError(f"the relay did not start in {tries} tries; log:\n" + log_path.read_text()[-3000:])


def render_template(helm: str, chart_dir: pathlib.Path, template: str) -> dict:
    out = subprocess.run([helm, "template", "botrelay", str(chart_dir), "-n", "botrelay",
                          "--set", "monitoring.enabled=true", "--show-only", template],
                         check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(out)


def render_rules(helm: str, chart_dir: pathlib.Path) -> dict:
    return render_template(helm, chart_dir, "templates/prometheusrule.yaml")["spec"]


def operator_honor_labels(helm: str, chart_dir: pathlib.Path) -> str:
    """honor_labels of the operator's scrape, as the chart's ServiceMonitor sets it."""
    (endpoint,) = render_template(helm, chart_dir, "templates/servicemonitor-operator.yaml")["spec"]["endpoints"]
    return "true" if endpoint.get("honorLabels") is True else "false"


def reconcile_endpoints(cluster: ApiServer, operator_admin: str, operator_log: pathlib.Path, create: dict,
                        patch: dict | None = None):
    """Creates MessagingEndpoints (name -> (spec, the Ready reason it must reach)),
    optionally patches the malformed one, and waits until the operator has
    reconciled all of it and counted one more failed reconciliation."""
    errors_before = scraped(operator_admin, "botrelay_operator_reconcile_errors_total")
    for name, (spec, _) in create.items():
        cluster.create_endpoint(name, spec)
    if patch:
        for name, body in patch.items():
            cluster.patch_endpoint(name, body)
    wanted = {name: reason for name, (_, reason) in create.items()}
    try:
        wait_for(f"Ready reasons {wanted}",
                 lambda: all(cluster.ready_reason(n) == r for n, r in wanted.items()), timeout=30)
        wait_for("a failed reconciliation counted",
                 lambda: scraped(operator_admin, "botrelay_operator_reconcile_errors_total") > errors_before,
                 timeout=30)
    except AssertionError as e:
        raise AssertionError(f"{e}; operator log:\n" + operator_log.read_text()[-3000:]) from None


@pytest.fixture(scope="module")
def stack(repo, helm4, chart_dir, tmp_path_factory):
    binaries = {name: repo / "target" / "debug" / name
                for name in ("botrelay", "botrelay-operator", "botrelay-test-apiserver")}
    for name, path in binaries.items():
        assert path.exists(), f"{path} is missing: build it first (cargo build -p {name}; tests/run does)"
    prometheus_bin = shutil.which("prometheus")
    assert prometheus_bin, "prometheus not found: install Debian's prometheus package (.ci/run does)"
    tmp = tmp_path_factory.mktemp("dashboard")
    processes = []
    servers = []
    receivers = Receivers()
    try:
        bot, bot_port = serve(lambda body, headers: receivers.bot(body))
        response, response_port = serve(receivers.response)
        servers += [bot, response]

        apiserver, apiserver_url, kubeconfig = start_apiserver(binaries["botrelay-test-apiserver"], tmp, NAMESPACE)
        processes.append(apiserver)
        operator_log = tmp / "operator.log"
        operator, operator_admin = start_operator(binaries["botrelay-operator"], kubeconfig, operator_log)
        processes.append(operator)
        cluster = ApiServer(apiserver_url)
        # Alone against a fresh API server, the operator takes the Lease at once.
        wait_for("the operator to lead", lambda: scraped(operator_admin, "botrelay_operator_leader") == 1, timeout=30)

        creds = tmp / "credentials"
        creds.mkdir()
        (creds / "client-token").write_text(CLIENT_TOKEN + "\n")
        (creds / "bot-token").write_text(BOT_TOKEN + "\n")
        for name in ("bot-signing-secret", "response-signing-secret"):
            (creds / name).write_text("whsec_" + base64.b64encode(os.urandom(32)).decode() + "\n")

        bot_url, response_url = f"http://127.0.0.1:{bot_port}/", f"http://127.0.0.1:{response_port}/"
        relay_args = ["--bot-url", bot_url, "--response-url", response_url,
                      "--credentials-dir", str(creds), "--store", "embedded", "--data-dir", str(tmp / "data"),
                      "--endpoint-name", ENDPOINT, "--retry-initial-backoff", "100ms",
                      "--retry-max-backoff", "1s", "--max-attempts", "3", "--bot-timeout", "60s"]
        relay, api, admin = start_relay(binaries["botrelay"], relay_args, tmp / "relay.log")
        processes.append(relay)
        # The endpoint's second relay pod: the same endpoint name and
        # credentials, a store of its own (a stand-in for the shared one).
        relay2_args = list(relay_args)
        relay2_args[relay2_args.index("embedded")] = "memory"
        relay2, api2, admin2 = start_relay(binaries["botrelay"], relay2_args, tmp / "relay-1.log")
        processes.append(relay2)

        rules_file = tmp / "botrelay.rules.yaml"
        rules_file.write_text(yaml.safe_dump(render_rules(helm4, chart_dir)))
        config = (HERE / "prometheus.yml").read_text()
        for key, value in {"@RULES_FILE@": str(rules_file), "@RELAY_ADMIN@": admin, "@RELAY2_ADMIN@": admin2,
                           "@NAMESPACE@": NAMESPACE, "@ENDPOINT@": ENDPOINT, "@OPERATOR_ADMIN@": operator_admin,
                           "@OPERATOR_HONOR_LABELS@": operator_honor_labels(helm4, chart_dir)}.items():
            config = config.replace(key, value)
        assert not re.search(r"@[A-Z_]+@", config), config
        (tmp / "prometheus.yml").write_text(config)
        prom_addr = f"127.0.0.1:{free_port()}"
        prom_log = open(tmp / "prometheus.log", "w")
        processes.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address={prom_addr}", "--log.level=warn"],
            stdout=prom_log, stderr=subprocess.STDOUT))
        prom = Prometheus(f"http://{prom_addr}")
        prom.relay_admins = [admin, admin2]
        wait_for("Prometheus to be ready", lambda: requests.get(f"http://{prom_addr}/-/ready", timeout=1).ok)
        try:
            wait_for("every target to be up", lambda: len(prom.query("up == 1")) == 3, timeout=30)
        except AssertionError:
            targets = prom.api("targets")["activeTargets"]
            raise AssertionError("targets not up: " + "; ".join(
                f"{t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t['lastError']}" for t in targets)
                + f"\nrelay exit status: {relay.poll()}\nrelay log:\n" + (tmp / "relay.log").read_text()[-3000:]
                + f"\nsecond relay exit status: {relay2.poll()}\nits log:\n" + (tmp / "relay-1.log").read_text()[-3000:]
                + f"\noperator exit status: {operator.poll()}\noperator log:\n" + operator_log.read_text()[-3000:])

        # The operator's work, in two rounds with scrapes in between (as the
        # relay's traffic below), so that rate() sees its counters grow: the
        # endpoint these two relays stand for (two pods on the nats store) and
        # a malformed one first; then a second endpoint (one pod), a third
        # whose two pods cannot start (its NATS credentials Secret is
        # missing), and a change to the malformed one that leaves it malformed
        # (so it is reconciled, and fails, again).
        reconcile_endpoints(cluster, operator_admin, operator_log, {
            ENDPOINT: ({"bot": {"url": bot_url}, "responseEndpoint": {"url": response_url},
                        "replicas": 2, "storage": NATS}, "RelayReady"),
            "broken": ({"bot": "not-an-object", "responseEndpoint": {"url": response_url}, "replicas": "many"},
                       "InvalidObject"),
        })

        # Two rounds of traffic with scrapes in between, so that every counter
        # exists before it grows and rate() sees the growth.
        client, client2 = Client(f"http://{api}"), Client(f"http://{api2}")
        drive_traffic(client, hold=False)
        drive_traffic(client2, hold=False)
        time.sleep(3)
        drive_traffic(client, hold=True)
        drive_traffic(client2, hold=True)  # a held message on each pod, the second one younger
        # More on the second pod, so that the two pods' numbers differ.
        assert all(client2.send("hello").status_code == 200 for _ in range(3))
        # Wait for the relay to be done with everything but the held message:
        # 2 rounds x (fail-always to the bot, reply-reject to the response).
        wait_for("dead letters for the bot and the response endpoint",
                 lambda: scraped(admin, "botrelay_messages_dead_lettered_total", target="bot") >= 2
                 and scraped(admin, "botrelay_messages_dead_lettered_total", target="response") >= 2,
                 timeout=60)
        wait_for("the held message to be the only one pending",
                 lambda: scraped(admin, "botrelay_queue_depth", target="bot") == 1
                 and scraped(admin, "botrelay_queue_depth", target="response") == 0, timeout=60)
        wait_for("the second relay's dead letters, and its held message the only one pending there",
                 lambda: scraped(admin2, "botrelay_messages_dead_lettered_total", target="bot") >= 2
                 and scraped(admin2, "botrelay_messages_dead_lettered_total", target="response") >= 2
                 and scraped(admin2, "botrelay_queue_depth", target="bot") == 1
                 and scraped(admin2, "botrelay_queue_depth", target="response") == 0, timeout=60)

        reconcile_endpoints(cluster, operator_admin, operator_log, {
            "orders": ({"bot": {"url": bot_url}, "responseEndpoint": {"url": response_url}}, "RelayReady"),
            "billing": ({"bot": {"url": bot_url}, "responseEndpoint": {"url": response_url}, "replicas": 2,
                         "storage": {**NATS, "nats": {**NATS["nats"],
                                                      "credentialsSecretRef": {"name": "billing-nats"}}}},
                        "SecretNotFound"),
        }, patch={"broken": {"spec": {"bot": {"url": bot_url}}}})
        time.sleep(4)  # a few scrapes and rule evaluations after the traffic
        yield prom
    finally:
        receivers.release.set()
        stop(processes)
        for s in servers:
            s.shutdown()


# --- the dashboard's queries ----------------------------------------------------


def load_dashboard(chart_dir):
    return json.loads((chart_dir / "dashboards" / "botrelay.json").read_text())


def as_grafana_would(expr: str) -> str:
    """The dashboard's variables, set to the test's namespace and endpoint."""
    return (expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$namespace", NAMESPACE)
            .replace("$endpoint", ENDPOINT))


def panel_queries(dashboard):
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]


def summarize(result) -> list:
    return [{"labels": {k: v for k, v in r["metric"].items()}, "value": r["value"][1]} for r in result]


def test_every_panel_query_returns_data(stack, chart_dir, repo):
    results, empty = [], []
    for title, ref, expr in panel_queries(load_dashboard(chart_dir)):
        result = stack.query(as_grafana_would(expr))
        results.append({"panel": title, "refId": ref, "expr": expr, "result": summarize(result)})
        if not result:
            empty.append(f"{title} [{ref}]: {expr}")
    out = repo / "target" / "dashboard-query-results.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    assert not empty, "panel queries that returned no data:\n" + "\n".join(empty)
    # NaN means a ratio or quantile of nothing: no data in disguise.
    nan = [f"{r['panel']} [{r['refId']}]" for r in results for v in r["result"] if v["value"] == "NaN"]
    assert not nan, f"panel queries that returned NaN: {nan}"


def test_dashboard_variables_find_the_namespace_and_endpoint(stack, chart_dir):
    variables = {v["name"]: v for v in load_dashboard(chart_dir)["templating"]["list"]}
    for name, expected in (("namespace", NAMESPACE), ("endpoint", ENDPOINT)):
        query = variables[name]["query"]["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m and m.group(2) == name, query
        values = stack.api(f"label/{name}/values", **{"match[]": as_grafana_would(m.group(1))})
        assert values == [expected], f"{query}: {values}"


def test_relay_endpoint_label_survives_the_scrape(stack):
    """honor_labels (honorLabels in the chart's PodMonitor, and in its
    ServiceMonitor for the operator's botrelay_operator_relay_pods) keeps the
    series' own endpoint and namespace labels; without it Prometheus would
    rename them exported_endpoint and exported_namespace."""
    assert stack.query('count({exported_endpoint!=""} or {exported_namespace!=""})') == []
    assert stack.query(f'botrelay_build_info{{endpoint="{ENDPOINT}", namespace="{NAMESPACE}"}}')


def test_panels_show_the_traffic_that_was_sent(stack):
    """Spot checks that the panels mean what they say: the outcomes the test
    caused are there, with sensible values."""
    def values(expr):
        return {tuple(sorted(r["metric"].items())): float(r["value"][1])
                for r in stack.query(as_grafana_would(expr))}

    received = values('sum by (source, outcome) (increase(botrelay_messages_received_total'
                      '{namespace=~"$namespace", endpoint=~"$endpoint"}[5m]))')
    outcomes = {dict(k)["outcome"] for k, v in received.items() if v > 0}
    assert {"accepted", "duplicate", "invalid", "unauthorized", "too_large", "unknown_conversation"} <= outcomes, received
    attempts = values('sum by (target, outcome) (botrelay_delivery_attempts_total{endpoint=~"$endpoint"})')
    for target in ("bot", "response"):
        assert attempts.get((("outcome", "http_error"), ("target", target)), 0) > 0, attempts
        assert attempts.get((("outcome", "success"), ("target", target)), 0) > 0, attempts
    retries = values('sum by (target) (botrelay_delivery_retries_total{endpoint=~"$endpoint"})')
    assert retries[(("target", "bot"),)] > 0 and retries[(("target", "response"),)] > 0, retries
    held = values('sum by (target) (botrelay_dead_letters{endpoint=~"$endpoint"})')
    assert held[(("target", "bot"),)] >= 2 and held[(("target", "response"),)] >= 2, held
    depth = values('sum by (target) (botrelay_queue_depth{endpoint=~"$endpoint"})')
    assert depth[(("target", "bot"),)] == 2, depth  # one held on each relay pod
    oldest = values('max by (target) (botrelay_oldest_pending_age_seconds{endpoint=~"$endpoint"})')
    assert oldest[(("target", "bot"),)] > 0, oldest
    ratio = values('sum by (target) (rate(botrelay_delivery_attempts_total{endpoint=~"$endpoint", outcome="success"}[1m]))'
                   ' / sum by (target) (rate(botrelay_delivery_attempts_total{endpoint=~"$endpoint"}[1m]))')
    assert all(0 < v < 1 for v in ratio.values()), ratio


def test_operator_panels_show_what_the_operator_did(stack, chart_dir):
    """The operator panels' queries, answered from the real operator's metrics:
    it leads, reconciled both rounds, failed on the malformed endpoint with the
    reason the alert names, and counts two ready endpoints and one not ready."""
    def values(expr):
        return {tuple(sorted(r["metric"].items())): float(r["value"][1])
                for r in stack.query(as_grafana_would(expr))}

    panel = {(title, ref): expr for title, ref, expr in panel_queries(load_dashboard(chart_dir))}
    results = values(panel["Reconciliations per second by result", "A"])
    assert results[(("result", "success"),)] > 0 and results[(("result", "error"),)] > 0, results
    errors = values(panel["Reconcile errors per second by reason", "A"])
    assert list(errors) == [(("reason", "undecodable_object"),)] and all(v > 0 for v in errors.values()), errors
    readiness = values(panel["Endpoints by readiness", "A"])
    # Ready: the relays' endpoint and orders; not: billing (no pod can start) and the malformed one.
    assert readiness == {(("ready", "true"),): 2.0, (("ready", "false"),): 2.0}, readiness
    leader = values(panel["Operator leader", "A"])
    assert leader == {(): 1.0}, leader
    quantiles = [values(panel["Reconcile duration p50 / p95 / p99", ref])[()] for ref in "ABC"]
    # An API server on loopback answers in milliseconds: well under the last bucket (10 s).
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2] < 10, quantiles
    # Every operator series comes from the operator's own scrape job.
    jobs = values('count by (job) ({__name__=~"botrelay_operator_.*"})')
    assert list(jobs) == [(("job", "botrelay-operator"),)], jobs


def test_relay_pods_panel_shows_ready_and_desired_per_endpoint(stack, chart_dir):
    """The operator's view of each endpoint's relay pods, under the endpoint's
    own namespace and name (which the operator's scrape must keep)."""
    panel = {(title, ref): expr for title, ref, expr in panel_queries(load_dashboard(chart_dir))}

    def pods(ref, endpoint):
        expr = panel["Relay pods: ready / desired", ref].replace("$endpoint", endpoint)
        return {(r["metric"]["namespace"], r["metric"]["endpoint"]): float(r["value"][1])
                for r in stack.query(as_grafana_would(expr))}

    ready, desired = pods("A", ENDPOINT), pods("B", ENDPOINT)
    assert ready == {(NAMESPACE, ENDPOINT): 2.0} and desired == {(NAMESPACE, ENDPOINT): 2.0}, (ready, desired)
    ready, desired = pods("A", ".*"), pods("B", ".*")
    assert desired == {(NAMESPACE, ENDPOINT): 2.0, (NAMESPACE, "orders"): 1.0, (NAMESPACE, "billing"): 2.0}, desired
    assert ready == {(NAMESPACE, ENDPOINT): 2.0, (NAMESPACE, "orders"): 1.0, (NAMESPACE, "billing"): 0.0}, ready


def aggregation(expr: str) -> str:
    """How a relay panel's query must combine the series of an endpoint's
    pods, by what it shows: the oldest pending age of an endpoint is the
    oldest of its pods'; whether a target is reachable, the worst of its
    pods' last probes; counts, rates and sizes add up."""
    if "histogram_quantile" in expr or ") / " in expr:
        return "ratio"  # of sums: not additive, but over all pods at once
    if "botrelay_oldest_pending_age_seconds" in expr:
        return "max"
    if "botrelay_target_reachable" in expr:
        return "min"
    return "sum"


def test_relay_panels_add_up_the_pods_of_an_endpoint(stack, chart_dir):
    """The endpoint runs on two relay pods, each with its own series. Every
    relay panel must show the endpoint, not its pods: no series of its has a
    pod or instance label, and evaluated at one instant, a summing panel is
    the sum of the same query over each pod alone, an age panel the larger."""
    def values(expr, at):
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in stack.query(expr, at=at)}

    at = time.time() - 2  # an instant both pods' scrapes have reached
    both_counted, checked = set(), 0
    for title, ref, expr in panel_queries(load_dashboard(chart_dir)):
        if "botrelay_operator_" in expr:
            continue
        whole = values(as_grafana_would(expr), at)
        for labels in whole:
            assert not {"pod", "instance"} & {k for k, _ in labels}, f"{title} [{ref}] shows pods apart: {labels}"
        kind = aggregation(expr)
        if kind == "ratio":
            continue
        per_pod = [values(as_grafana_would(expr.replace('endpoint=~"$endpoint"',
                                                        f'endpoint=~"$endpoint", pod="{pod}"')), at)
                   for pod in RELAY_PODS]
        for labels, value in whole.items():
            parts = [p.get(labels, 0.0) for p in per_pod]
            if kind == "min":
                combined = min(p[labels] for p in per_pod if labels in p)
            else:
                combined = sum(parts) if kind == "sum" else max(parts)
            assert abs(value - combined) <= 1e-9 * max(1.0, abs(value)), (
                f"{title} [{ref}] {dict(labels)}: {value}, but the pods have {parts} ({kind})")
            if all(v > 0 for v in parts):
                both_counted.add((title, ref))
        checked += 1
    assert checked >= 20, checked
    # Panels where both pods had something to add, so that the check meant something.
    for panel in (("Relays up", "A"), ("Accepted messages/s", "A"), ("Dead letters held", "A"),
                  ("Oldest pending", "A"), ("Messages received per second by outcome", "A"),
                  ("Relay versions", "A")):
        assert panel in both_counted, (panel, sorted(both_counted))


def test_top_row_adds_up_what_each_relay_pod_reports(stack, chart_dir):
    """What each relay pod reports on its own /metrics, added up (the oldest,
    for the pending age), is what the top row shows for the endpoint."""
    # The stats of the top row (a graph of the same title follows some).
    stat = {p["title"]: p["targets"][0]["expr"] for p in load_dashboard(chart_dir)["panels"] if p["type"] == "stat"}
    own = [scraped(admin, "botrelay_dead_letters") for admin in stack.relay_admins]
    assert all(n > 0 for n in own), own
    (shown,) = stack.query(as_grafana_would(stat["Dead letters held"]))
    assert float(shown["value"][1]) == sum(own), (shown, own)
    depth = [scraped(admin, "botrelay_queue_depth") for admin in stack.relay_admins]
    (shown,) = stack.query(as_grafana_would(stat["Queue depth"]))
    assert float(shown["value"][1]) == sum(depth) == 2, (shown, depth)
    # The oldest pending message of the endpoint is the older of the two held.
    ages = [scraped(admin, "botrelay_oldest_pending_age_seconds", target="bot") for admin in stack.relay_admins]
    (shown,) = stack.query(as_grafana_would(stat["Oldest pending"]))
    # (each relay sets its gauge every second, Prometheus scrapes every second)
    assert all(a > 0 for a in ages) and max(ages) - 2.5 <= float(shown["value"][1]) <= max(ages), (shown, ages)
    (shown,) = stack.query(as_grafana_would(stat["Relays up"]))
    assert float(shown["value"][1]) == len(stack.relay_admins), shown


# --- the alerts -------------------------------------------------------------------


def test_alert_rules_load_and_evaluate(stack, repo):
    def evaluated_rules():
        rules = [r for g in stack.api("rules", type="alert")["groups"] for r in g["rules"]]
        # A rule never evaluated has the zero time as its last evaluation.
        return rules if rules and not any(r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = wait_for("every rule to be evaluated", evaluated_rules, timeout=20)
    assert len(rules) >= 5, [r["name"] for r in rules]
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    states = []
    for r in rules:
        result = stack.query(r["query"])  # valid PromQL, as a query too
        states.append({"alert": r["name"], "state": r["state"], "expr": r["query"], "result": summarize(result)})
    (repo / "target" / "dashboard-alert-states.json").write_text(json.dumps(states, indent=2) + "\n")
    state = {r["name"]: r["state"] for r in rules}
    # The test's dead letters make this one fire at once ("for: 0m").
    assert state["BotrelayDeadLettersGrowing"] == "firing", state
    # The operator's failed reconciliations and its not-ready endpoint: true
    # at once, pending until their "for" has passed.
    assert state["BotrelayReconcileErrors"] == "pending", state
    assert state["BotrelayEndpointsNotReady"] == "pending", state
    # Every message the test sends is stored: nothing is refused.
    assert state["BotrelayRejectingMessages"] == "inactive", state
    # The test's relay remembers every messageId it is sent.
    assert state["BotrelayDedupeTableFull"] == "inactive", state
    # The test's bot answers with replies the relay can read.
    assert state["BotrelayBotAnswersUnreadable"] == "inactive", state
    # billing asks for two relay pods and has none ready; the relays'
    # endpoint (two of two) and orders (one of one) are whole. Pending until
    # its "for" (10 minutes) has passed.
    assert state["BotrelayRelayPodsDown"] == "pending", state
    pods_down = {r["alert"]: r["result"] for r in states}["BotrelayRelayPodsDown"]
    assert pods_down == [{"labels": {"namespace": NAMESPACE, "endpoint": "billing"}, "value": "2"}], pods_down
    # The operator leads and is scraped: these must stay quiet.
    assert state["BotrelayOperatorNoLeader"] == "inactive", state
    assert state["BotrelayOperatorDown"] == "inactive", state
