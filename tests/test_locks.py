"""Hashed lock files (requirements/*.lock, written by ``make lock``) and the images that use them.

* every entry of every lock is pinned (``==``) and carries sha256 hashes, so
  ``pip install --require-hashes`` accepts it and nothing floats;
* each lock satisfies pyproject.toml: every requirement of the base dependencies and of its
  extra (and of [build-system], since the images build the project without isolation) is
  pinned at a version the requirement admits; the GPU lock has onnxruntime-gpu in place of
  onnxruntime, at a version the serve extra's onnxruntime requirement admits;
* each lock was written by the Makefile's ``lock`` recipe (its header is that command);
* each Dockerfile installs its lock with ``--require-hashes`` and the project with ``--no-deps``.

When pyproject.toml changes, ``make lock`` brings the locks back in line.
"""

from __future__ import annotations

import re
import shlex

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_deploy import ROOT, final_stage, instructions, parse_dockerfile

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

REQUIREMENTS = ROOT / "requirements"
# lock file → (extra, Python version of the image, Dockerfile that installs it)
LOCKS = {
    "serve.lock": ("serve", "3.11", "docker/Dockerfile"),
    "train.lock": ("train", "3.11", "docker/Dockerfile.train"),
    "serve-gpu.lock": ("serve", "3.10", "docker/Dockerfile.gpu"),
}
# Replaced in the GPU lock: the CPU build by the CUDA one (same `onnxruntime` module).
GPU_REPLACES = {"onnxruntime": "onnxruntime-gpu"}


def read_lock(name: str) -> tuple[dict[str, str], dict[str, list[str]], str]:
    """(name → pinned version, name → hashes, header command) of a uv/pip-compile lock."""
    text = (REQUIREMENTS / name).read_text()
    header = next(line for line in text.splitlines() if "uv pip compile" in line).lstrip("# ").strip()
    pins, hashes = {}, {}
    for entry in re.split(r"\n(?=[A-Za-z0-9])", re.sub(r"#.*", "", text)):
        entry = entry.replace("\\\n", " ").strip()
        if not entry:
            continue
        requirement, *options = entry.split(" --hash=")
        m = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)(\s*;.*)?", requirement.strip())
        assert m, f"{name}: not pinned: {requirement!r}"
        key = canonicalize_name(m.group(1))
        pins[key] = m.group(3)
        hashes[key] = [h.strip() for h in options]
    return pins, hashes, header


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements_for(extra: str) -> list[Requirement]:
    config = pyproject()
    project = config["project"]
    reqs = project["dependencies"] + project["optional-dependencies"][extra] + config["build-system"]["requires"]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_entry_is_pinned_with_sha256_hashes(name):
    pins, hashes, _ = read_lock(name)
    assert len(pins) >= 10
    for package, digests in hashes.items():
        assert digests, f"{name}: {package} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in digests), (package, digests)


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_lock_satisfies_pyproject(name):
    extra, python, _ = LOCKS[name]
    pins, _, _ = read_lock(name)
    env = {
        **default_environment(),
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": extra,
    }
    gpu = name == "serve-gpu.lock"
    problems = []
    for req in requirements_for(extra):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        package = canonicalize_name(req.name)
        if gpu and package in GPU_REPLACES:
            assert package not in pins, f"{name} must not install the CPU {package}"
            package = GPU_REPLACES[package]
        version = pins.get(package)
        if version is None:
            problems.append(f"{req} is not in {name}")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{name} pins {package}=={version}, but pyproject.toml asks for {req}")
    assert not problems, "\n".join(problems) + "\n(run `make lock`)"


def test_train_lock_torch_is_one_pip_can_take_from_local_wheels():
    """The train extra's torch range admits the torch 2.14.1 wheel that lies on these machines (so
    `make install` takes it from disk), and the lock pins torch and torchvision (within that
    range: checked above)."""
    torch_req = next(r for r in requirements_for("train") if r.name == "torch")
    assert torch_req.specifier.contains("2.14.1")
    pins, _, _ = read_lock("train.lock")
    assert "torch" in pins and "torchvision" in pins


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_lock_is_what_make_lock_writes(name):
    _, _, header = read_lock(name)
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.M))
    variables.update(re.findall(r"^(\w+) = (.*)$", makefile, re.M))
    recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    commands = []
    for line in recipe.splitlines():
        line = line.strip()
        for _ in range(3):
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        commands.append(shlex.split(line))
    (command,) = [c for c in commands if c[-1] == f"requirements/{name}"]
    # uv writes its command without the program path and the --quiet flag.
    expected = [t for t in command[command.index("pip") :] if t != "--quiet"]
    assert shlex.split(header) == ["uv", *expected], f"{name} header {header!r} is not the Makefile's lock command"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_image_installs_its_lock_with_hashes(name):
    _, _, dockerfile = LOCKS[name]
    parsed = parse_dockerfile(ROOT / dockerfile)
    copies = " ".join(instructions(parsed, "COPY"))
    assert f"requirements/{name}" in copies
    runs = " ".join(instructions(final_stage(parsed) if "train" in name else parsed, "RUN"))
    assert re.search(rf"pip install [^&]*--require-hashes --no-deps -r \S*requirements/{re.escape(name)}", runs), runs
    # The project itself: nothing resolved, the backend taken from the lock.
    assert re.search(r"pip install [^&]*--no-deps --no-build-isolation '\S*\[\w+\]'", runs), runs
    assert "pip check" in runs
    assert "requirements" in (ROOT / ".dockerignore").read_text(), "the lock must be in the build context"
