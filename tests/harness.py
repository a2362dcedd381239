"""Processes the cross-component tests run: the test API server and the real
operator, started as a user would start them, with the waits around them."""

import json
import os
import pathlib
import subprocess
import time


def wait_for(what, check, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - report the last error on timeout
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last!r}" if last else ""))


def start_apiserver(apiserver_bin, tmp, namespace, *args) -> tuple[subprocess.Popen, str, pathlib.Path]:
    """The test API server on a port the kernel picks; (process, URL, kubeconfig).
    `args` go to the server (e.g. `--rbac roles.json`)."""
    kubeconfig = tmp / "kubeconfig"
    proc = subprocess.Popen([str(apiserver_bin), "--kubeconfig", str(kubeconfig), "--namespace", namespace, *args],
                            stdout=subprocess.PIPE, stderr=open(tmp / "apiserver.log", "w"), text=True)
    url = proc.stdout.readline().strip()  # printed once it listens and the kubeconfig is written
    assert url.startswith("http://127.0.0.1:"), (
        f"the test API server did not start (exit status {proc.poll()}):\n" + (tmp / "apiserver.log").read_text())
    return proc, url, kubeconfig


def start_operator(operator_bin, kubeconfig, log_path, lease_namespace="botrelay",
                   extra_env=None) -> tuple[subprocess.Popen, str]:
    """The operator with leader election on and its admin server on a port the
    kernel picks (a port picked here could be taken meanwhile); (process, admin)."""
    env = dict(extra_env or {})
    env |= {"PATH": os.environ.get("PATH", ""), "KUBECONFIG": str(kubeconfig),
           "BOTRELAY_ADMIN_LISTEN": "127.0.0.1:0", "BOTRELAY_LEADER_ELECTION": "true",
           "POD_NAMESPACE": lease_namespace, "POD_NAME": "botrelay-operator-0", "BOTRELAY_LOG_LEVEL": "info"}
    proc = subprocess.Popen([str(operator_bin)], env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))

    def admin_addr():
        assert proc.poll() is None, f"the operator exited with {proc.returncode}"
        for line in log_path.read_text().splitlines():
            if "admin server listening" in line:
                return json.loads(line)["addr"]
        return None

    try:
        return proc, wait_for("the operator's admin server", admin_addr, timeout=20)
    except AssertionError as e:
        proc.kill()
        raise AssertionError(f"{e}; operator log:\n" + log_path.read_text()[-3000:]) from None


def stop(processes):
    """SIGTERM in reverse order of start, each in turn: the operator hands its
    Lease back to an API server that is still there."""
    for p in reversed(processes):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
