"""Fixtures shared by the cross-component tests: where the repository is, a helm
binary (fetched and cached by tests/tools/fetch-helm), and rendering the chart."""

import pathlib
import subprocess

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "botrelay"


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def chart_dir() -> pathlib.Path:
    return CHART


def fetch_helm(major: str) -> str:
    out = subprocess.run(
        [str(REPO / "tests" / "tools" / "fetch-helm"), major],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="session", params=["4", "3"], ids=["helm4", "helm3"])
def helm(request) -> str:
    """Each test that uses helm runs with Helm 4 and with Helm 3."""
    return fetch_helm(request.param)


@pytest.fixture(scope="session")
def helm4() -> str:
    """Helm 4 only, for tests that use helm as a tool rather than test the chart with it."""
    return fetch_helm("4")


class Rendered(list):
    """The objects `helm template` produced, with lookups by kind and name."""

    def kinds(self, kind: str) -> list:
        return [o for o in self if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.kinds(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
        return found[0]


@pytest.fixture(scope="session")
def render(helm):
    """render(*set_args, values=None) -> Rendered; raises CalledProcessError with
    helm's stderr when the chart does not render."""

    def _render(*sets: str, values: dict | None = None, release: str = "botrelay",
                namespace: str = "botrelay", extra: tuple = ()) -> Rendered:
        cmd = [helm, "template", release, str(CHART), "--namespace", namespace, *extra]
        for s in sets:
            cmd += ["--set", s]
        stdin = None
        if values is not None:
            cmd += ["--values", "-"]
            stdin = yaml.safe_dump(values)
        out = subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True)
        return Rendered(d for d in yaml.safe_load_all(out.stdout) if d)

    return _render
