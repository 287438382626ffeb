"""Process metrics, build/model identity and admission gauges on a real server's /metrics."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import httpx
import pytest
from serving_model import ROOT, ServerProcess, build_model_folder

from serving.buildinfo import model_checksum


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")), float(m.group(2))))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("build-metrics-model"))


@pytest.fixture(scope="module")
def metrics_text(model_dir, tmp_path_factory):
    with ServerProcess(
        model_dir,
        "--queue-size",
        "7",
        tmp_dir=tmp_path_factory.mktemp("srv"),
        env={**os.environ, "GIT_REVISION": "0123abcd"},
    ) as server:
        yield httpx.get(server.url + "/metrics", timeout=10).text


def test_process_collector_is_on_the_servers_registry(metrics_text):
    (([], rss),) = [([], v) for _, v in samples(metrics_text, "process_resident_memory_bytes")]
    assert rss > 10e6, "a Python process with ONNX Runtime uses more than 10 MB"
    assert samples(metrics_text, "process_start_time_seconds")[0][1] > 1.6e9
    assert samples(metrics_text, "process_cpu_seconds_total")[0][1] > 0
    assert samples(metrics_text, "process_open_fds")[0][1] > 0
    assert samples(metrics_text, "python_info")


def test_build_info_names_version_revision_model_and_checksum(metrics_text, model_dir):
    ((labels, value),) = samples(metrics_text, "eed_build_info")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    expected_checksum = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    assert value == 1
    assert labels == {
        "version": version,
        "revision": "0123abcd",
        "model": manifest["name"],
        "model_checksum": expected_checksum,
    }


def test_model_checksum_changes_with_any_weight_file():
    files = {"exit1.onnx": "a" * 64, "stage1.onnx": "b" * 64, "cascade.onnx": "d" * 64}
    assert model_checksum(files) == model_checksum(dict(reversed(list(files.items()))))
    for name in files:
        assert model_checksum(files) != model_checksum({**files, name: "c" * 64}), name
    assert model_checksum(files) != model_checksum({**files, "exit2.onnx": "c" * 64})  # a file added


def test_revision_comes_from_the_checkout_without_git_revision(model_dir, tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = {k: v for k, v in os.environ.items() if k != "GIT_REVISION"}
    with ServerProcess(model_dir, tmp_dir=tmp_path, env=env) as server:
        text = httpx.get(server.url + "/metrics", timeout=10).text
    ((labels, _),) = samples(text, "eed_build_info")
    assert labels["revision"] == head


def test_admission_gauges(metrics_text):
    assert samples(metrics_text, "eed_admission_limit") == [({}, 7.0)]
    assert samples(metrics_text, "eed_admitted_requests") == [({}, 0.0)], "idle: nothing admitted"


def test_the_servers_own_failures_are_counted_from_zero(metrics_text, tmp_path):
    """A counter series born at 1 has no earlier sample: rate() and increase() miss its first
    5xx, and the error-ratio alert with it. Every policy's 500 and 503 exist before any request."""
    from serving.policy import PolicyParams, policy_labels

    series = {(s["exit"], s["policy"], s["status"]): v for s, v in samples(metrics_text, "eed_requests_total")}
    policies = ["none", "exit", "confidence", "budget", "budget_gflops", "budget_ms"]
    # the list is every label a request can carry (PolicyParams.name spells them out on its own)
    kinds = [{}, {"exit": 1}, {"confidence": (0.5,)}, {"budget_gflops": 1.0}, {"budget_ms": 5.0}]
    kinds += [{"budget_gflops": 1.0, "budget_ms": 5.0}, {"policy": "half"}]
    assert {PolicyParams(**kw).name for kw in kinds} == set(policy_labels(["half"]))
    assert series == {("none", p, status): 0.0 for p in policies for status in ("500", "503")}
    # and a calibrated policy's label too
    from serving_model import with_calibrated_policy

    from serving.manifest import load_manifest
    from serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    metrics.describe_model(load_manifest(with_calibrated_policy(build_model_folder(tmp_path))), "cpu")
    text = metrics.render().decode()
    assert 'eed_requests_total{exit="none",policy="policy:half",status="500"} 0.0' in text
