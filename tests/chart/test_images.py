"""The two Dockerfiles and the images the chart points to. No Docker engine runs
in CI, so the Dockerfiles are read rather than built: each must build the
workspace package that produces its binary with `cargo build --release`, copy
exactly target/release/<binary>, and run it on distroless as a numeric non-root
user; and the chart's default images must be the ones they make."""

import re
import tomllib

import pytest
import yaml

IMAGES = {
    # Dockerfile: (package, binary, chart values key, image repository)
    "relay/Dockerfile": ("botrelay", "botrelay", "relay", "botrelay/relay"),
    "operator/Dockerfile": ("botrelay-operator", "botrelay-operator", "operator", "botrelay/operator"),
}


def instructions(path):
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def workspace_members(repo):
    return tomllib.loads((repo / "Cargo.toml").read_text())["workspace"]["members"]


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_builds_the_release_binary_on_distroless_non_root(repo, dockerfile):
    package, binary, _, _ = IMAGES[dockerfile]
    steps = instructions(repo / dockerfile)
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    build_image, _, stage = froms[0].partition(" AS ")
    assert build_image.split(":")[0] == "rust" and stage.strip() == "build", froms[0]
    assert froms[1] == "gcr.io/distroless/cc-debian12:nonroot"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert re.search(rf"cargo build --release\b.*-p {re.escape(package)}(\s|$)", runs), runs
    assert f"target/release/{binary} " in runs + " ", runs
    runtime = steps[[i for i, (w, _) in enumerate(steps) if w == "FROM"][1]:]
    copies = [args for word, args in runtime if word == "COPY"]
    assert any(c.startswith("--from=build ") and c.endswith(f"/usr/local/bin/{binary}") for c in copies), copies
    (user,) = [args for word, args in runtime if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: must be numeric and not root for runAsNonRoot"
    (entrypoint,) = [args for word, args in runtime if word == "ENTRYPOINT"]
    assert entrypoint == f'["/usr/local/bin/{binary}"]'


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_copies_every_workspace_member(repo, dockerfile):
    """cargo refuses to build when a member of the workspace is missing, so a
    crate added to Cargo.toml must be added to the COPY lines too."""
    copied = {args.split()[0] for word, args in instructions(repo / dockerfile) if word == "COPY"
              and not args.startswith("--from")}
    for needed in ["Cargo.toml", *workspace_members(repo)]:
        assert needed in copied or any(needed.startswith(c.rstrip("/") + "/") for c in copied), (
            f"{dockerfile} does not copy {needed}")
    assert "Cargo.lock" in " ".join(args for w, args in instructions(repo / dockerfile) if w == "COPY")


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_the_package_and_binary_exist_in_the_workspace(repo, dockerfile):
    package, binary, _, _ = IMAGES[dockerfile]
    manifests = {m: tomllib.loads((repo / m / "Cargo.toml").read_text()) for m in workspace_members(repo)}
    owners = [m for m, t in manifests.items() if t.get("package", {}).get("name") == package]
    assert owners, f"no workspace package named {package}"
    bins = [b["name"] for b in manifests[owners[0]].get("bin", [])] or [package]
    assert binary in bins, f"package {package} has no binary {binary}: {bins}"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_chart_defaults_point_to_the_images(chart_dir, dockerfile):
    _, _, key, repository = IMAGES[dockerfile]
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    assert values[key]["image"]["repository"] == repository
    assert values[key]["image"]["tag"] == "", "empty tag: the chart's appVersion"
