"""k8s/: the kustomize base and its overlays (gpu, kserve), without a cluster.

Each is rendered with ``kubectl kustomize``; built-in kinds are validated with
``kubernetes-validate --strict`` (its schemas ship with it, no cluster or network needed), and
the KServe runtime's container is validated as a core Container. Then what a schema cannot
know is cross-checked against the code: probe paths are routes of the app, every EED_*
variable is a server setting, the port the server listens on (EED_PORT) is the container port
the probes and the Service use, the UID is the Dockerfile's, and the shutdown timings add up
(grace period > preStop + drain + requests in flight).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from test_deploy import (
    CONTAINER_PORT,
    ROOT,
    _tool,
    env_of,
    final_stage,
    healthcheck_cmd,
    instructions,
    parse_dockerfile,
    server_setting_names,
)

from serving.drain import SHUTDOWN_TIMEOUT_S

K8S = ROOT / "k8s"
KUBECTL = _tool("kubectl")
VALIDATE = _tool("kubernetes-validate")
OVERLAYS = ["base", "overlays/gpu", "overlays/kserve", "overlays/monitored"]
BUILTIN_GROUPS = ("v1", "apps/", "autoscaling/", "policy/", "batch/", "networking.k8s.io/")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (make system-deps installs it)")
needs_validate = pytest.mark.skipif(VALIDATE is None, reason="kubernetes-validate not installed (dev extra)")


def render(overlay: str) -> list[dict]:
    r = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kubectl kustomize {overlay}:\n{r.stderr}"
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


_rendered: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    if overlay not in _rendered:
        _rendered[overlay] = render(overlay)
    return _rendered[overlay]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def env_map(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


_app = None


def the_app():
    global _app
    if _app is None:
        from serving.app import create_app
        from serving.settings import ServerSettings

        _app = create_app(ServerSettings(model_dir=ROOT / "exported" / "fmnist-resnet18-eed"))
    return _app


def app_routes() -> set[str]:
    """Path templates the app serves (included routers are resolved lazily, so ask OpenAPI too)."""
    app = the_app()
    return {r.path for r in app.routes if getattr(r, "path", None)} | set(app.openapi()["paths"])


def answers(path: str) -> int:
    """The status the app gives GET path (no lifespan: the model is not loaded, so /readyz is 503)."""
    import asyncio

    import httpx

    async def get() -> int:  # ASGITransport runs no lifespan: the model stays unloaded
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=the_app()), base_url="http://pod") as client:
            return (await client.get(path)).status_code

    return asyncio.run(get())


def dockerfile_uid(dockerfile: str) -> int:
    user = instructions(final_stage(parse_dockerfile(ROOT / dockerfile)), "USER")[-1]
    return int(user.split(":")[0])


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([VALIDATE, "--strict", str(path)], capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------
# Render and validate
# --------------------------------------------------------------------------------------


@needs_kubectl
@needs_validate
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_built_in_kinds_validate_strictly(overlay, tmp_path):
    docs = rendered(overlay)
    builtin = [d for d in docs if d["apiVersion"].startswith(BUILTIN_GROUPS)]
    if overlay == "overlays/kserve":
        # KServe's own kinds only: no built-in schema; their fields are checked by the KServe tests below.
        assert {d["kind"] for d in docs} == {"ServingRuntime", "InferenceService"} and builtin == []
        return
    assert {d["kind"] for d in builtin} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    # Only the monitored overlay needs a CRD (the Prometheus Operator's): `kubectl apply -k k8s/base`
    # failed on a plain cluster with "no matches for kind ServiceMonitor".
    others = {d["kind"] for d in docs} - {d["kind"] for d in builtin}
    assert others == ({"ServiceMonitor"} if overlay == "overlays/monitored" else set()), others
    for i, doc in enumerate(builtin):
        path = tmp_path / f"{i}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        r = validate(path)
        assert r.returncode == 0 and "passed" in r.stdout + r.stderr, f"{overlay} {doc['kind']}:\n{r.stdout}{r.stderr}"


@needs_validate
def test_the_validator_rejects_an_unknown_field(tmp_path):
    """The strict validation above can fail: a misspelt field is refused."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "x"},
                "spec": {"ports": [{"port": 80, "targetPrt": 8000}]},
            }
        )
    )
    assert validate(path).returncode != 0


@needs_kubectl
def test_overlays_keep_their_images_once_pointed_at_a_registry(tmp_path):
    """The README's steps: `kustomize edit set image` in the base, in the GPU overlay and in the KServe
    overlay. The GPU pods must still run the GPU image (they ran the CPU one, which refuses
    EED_PROVIDERS=cuda, once the base's image had a registry)."""
    import shutil

    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)

    def point(folder: str, name: str, new_name: str) -> None:
        path = copy / folder / "kustomization.yaml"
        doc = yaml.safe_load(path.read_text())
        (entry,) = [i for i in doc["images"] if i["name"] == name]
        entry.update(newName=new_name, newTag="v7")
        path.write_text(yaml.safe_dump(doc))

    point("base", "eed-anytime-server", "registry.example/eed-anytime-server")
    point("overlays/gpu", "eed-anytime-server-gpu", "registry.example/eed-anytime-server-gpu")
    point("overlays/kserve", "eed-anytime-server", "registry.example/eed-anytime-server")

    def images(overlay: str) -> set[str]:
        r = subprocess.run([KUBECTL, "kustomize", str(copy / overlay)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return set(re.findall(r"image: (\S+)", r.stdout))

    assert images("base") == {"registry.example/eed-anytime-server:v7"}
    assert images("overlays/gpu") == {"registry.example/eed-anytime-server-gpu:v7"}
    assert images("overlays/kserve") == {"registry.example/eed-anytime-server:v7"}


# --------------------------------------------------------------------------------------
# The base Deployment against the image and the app
# --------------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_deployment_matches_the_image_and_the_app(overlay):
    docs = rendered(overlay)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_map(container)
    dockerfile = "docker/Dockerfile.gpu" if overlay.endswith("gpu") else "docker/Dockerfile"
    image_env = env_of(parse_dockerfile(ROOT / dockerfile))

    # Image: the overlay's; the GPU overlay asks for one GPU and runs CUDA or nothing.
    image = container["image"]
    if overlay.endswith("gpu"):
        assert image.startswith("eed-anytime-server-gpu:")
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["nvidia.com/gpu"] == 1
        assert env.get("EED_PROVIDERS", image_env.get("EED_PROVIDERS")) == "cuda"
    else:
        assert image.startswith("eed-anytime-server:")
        assert "nvidia.com/gpu" not in str(container["resources"])
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and {"cpu", "memory"} <= set(
        container["resources"]["limits"]
    )

    # Env: real settings only; the port the server binds is the container port everything uses.
    settings = {f"EED_{n.upper()}" for n in server_setting_names()} | {"EED_MODEL_DIR", "EED_HOST", "EED_PORT"}
    assert set(env) <= settings, f"not settings: {sorted(set(env) - settings)}"
    port = int(env.get("EED_PORT", image_env["EED_PORT"]))
    assert port == CONTAINER_PORT
    assert env.get("EED_HOST", image_env["EED_HOST"]) == "0.0.0.0"
    (http,) = container["ports"]
    assert http["containerPort"] == port
    service = one(docs, "Service")
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in (http["name"], port)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()

    # Probes: /readyz for startup and readiness, /healthz for liveness; real routes, right port.
    routes = app_routes()
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    assert probes["startup"]["path"] == probes["readiness"]["path"] == "/readyz"
    assert probes["liveness"]["path"] == "/healthz"
    for kind, probe in probes.items():
        assert probe["path"] in routes, f"{kind} probe {probe['path']} is not a route of the app"
        assert answers(probe["path"]) != 404 and probe["port"] in (http["name"], port)
    assert answers("/healthz") == 200 and answers("/readyz") == 503, "model not loaded: live, not ready"
    # One slow /readyz must not take a busy pod out of the endpoints (a terminating one leaves them anyway)
    assert container["readinessProbe"].get("failureThreshold", 3) >= 2
    # The HEALTHCHECK of the image probes the same route.
    assert healthcheck_cmd(parse_dockerfile(ROOT / dockerfile)) == ["python", "-m", "serving.healthcheck"]
    assert "/readyz" in (ROOT / "serving" / "healthcheck.py").read_text()

    # Security: non-root with the Dockerfile's numeric UID, read-only root, a writable /tmp.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == dockerfile_uid(dockerfile)
    csec = container["securityContext"]
    assert csec["readOnlyRootFilesystem"] is True and csec["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    # Shutdown: grace period > preStop sleep + drain window + requests in flight.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    sleep = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", " ".join(command)).group(1))
    drain = float(env["EED_DRAIN_SECONDS"])
    assert drain > 0 and sleep > 0
    assert pod["terminationGracePeriodSeconds"] > sleep + drain + SHUTDOWN_TIMEOUT_S


@needs_kubectl
def test_hpa_pdb_and_servicemonitor_target_the_deployment():
    docs = rendered("overlays/monitored")
    deployment, hpa, pdb = (
        one(docs, "Deployment"),
        one(docs, "HorizontalPodAutoscaler"),
        one(docs, "PodDisruptionBudget"),
    )
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The HPA owns the count: a replicas field would reset it on every `kubectl apply`.
    for overlay in ("base", "overlays/gpu"):
        assert "replicas" not in one(rendered(overlay), "Deployment")["spec"], overlay
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]

    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert "/metrics" in app_routes()
    # The scrape job is the Service's name: the job the alert rules select.
    alerts = (ROOT / "docker/prometheus/rules/alerts.yml").read_text()
    assert f'job="{service["metadata"]["name"]}"' in alerts


# --------------------------------------------------------------------------------------
# KServe
# --------------------------------------------------------------------------------------


@needs_kubectl
def test_kserve_overlay_serves_the_model_from_storage_uri(tmp_path):
    docs = rendered("overlays/kserve")
    runtime, isvc = one(docs, "ServingRuntime"), one(docs, "InferenceService")
    assert not [d for d in docs if d["kind"] in ("Deployment", "HorizontalPodAutoscaler")], "KServe owns those"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert re.match(r"^(gs|s3|https?|pvc|oci)://", model["storageUri"])
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]

    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container" and container["image"].startswith("eed-anytime-server:")
    env = env_map(container)
    settings = {f"EED_{n.upper()}" for n in server_setting_names()} | {"EED_MODEL_DIR", "EED_HOST", "EED_PORT"}
    assert set(env) <= settings, f"not settings: {sorted(set(env) - settings)}"
    assert env["EED_MODEL_DIR"] == "/mnt/models", "where KServe's storage initializer puts storageUri"
    # KServe's clients address the InferenceService's name, which KServe substitutes for {{.Name}}
    assert env["EED_MODEL_NAME"] == "{{.Name}}"
    port = int(env["EED_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]
    # KServe reads its own metrics annotations (prometheus.kserve.io/*), not prometheus.io/*
    notes = isvc["metadata"]["annotations"]
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert notes["prometheus.kserve.io/port"] == str(port) and notes["prometheus.kserve.io/path"] == "/metrics"
    routes = app_routes()
    for kind in ("readiness", "liveness"):
        probe = container[f"{kind}Probe"]["httpGet"]
        assert probe["path"] in routes and probe["port"] == port
    assert container["readinessProbe"].get("failureThreshold", 3) >= 2
    assert container["securityContext"]["runAsUser"] == dockerfile_uid("docker/Dockerfile")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Knative (KServe's Serverless mode) refuses the field and waits the revision timeout (300 s);
    # in RawDeployment mode Kubernetes' default of 30 s must cover the drain and requests in flight.
    assert "terminationGracePeriodSeconds" not in isvc["spec"]["predictor"]
    assert 30 > float(env["EED_DRAIN_SECONDS"]) + SHUTDOWN_TIMEOUT_S

    # The container (a core Container inside the CRD) validates as one, with its volumes.
    if VALIDATE is not None:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kserve-container"},
            "spec": {"containers": [container], "volumes": runtime["spec"]["volumes"]},
        }
        path = tmp_path / "pod.yaml"
        path.write_text(yaml.safe_dump(pod))
        r = validate(path)
        assert r.returncode == 0, r.stdout + r.stderr


def test_kserve_protocol_v2_routes_exist_when_declared():
    """The runtime declares the Open Inference Protocol v2: the app must serve its routes."""
    runtime = yaml.safe_load((K8S / "overlays/kserve/servingruntime.yaml").read_text())
    assert "v2" in runtime["spec"]["protocolVersions"]
    routes = app_routes()  # no skip when there are none: losing them is what this test is for
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/{name}/infer"):
        assert path in routes, path


def test_readme_documents_the_kubernetes_deployment():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes") :]
    for phrase in (
        "kubectl apply -k k8s/base",
        "k8s/overlays/gpu",
        "k8s/overlays/kserve",
        "k8s/overlays/monitored",
        "storageUri",
        "EED_DRAIN_SECONDS",
        "kustomize edit set image",
    ):
        assert phrase in section, phrase
