"""The serving package imports and serves with torch and torchvision impossible to import, and
with onnx gone too (the server then runs cascades stage by stage)."""

from __future__ import annotations

import subprocess
import sys

import httpx
from serving_model import (
    ROOT,
    ServerProcess,
    build_model_folder,
    encode,
    expected_label,
    torch_blocking_env,
    uniform_image,
)

WITHOUT_ONNX = ("torch", "torchvision", "onnx")
CHECK = """
import importlib, pkgutil, sys
for name in ("torch", "onnx", "torchvision"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        assert "blocked" in str(exc), exc
    else:
        raise SystemExit(f"the {name} blocker did not work")
import onnxruntime  # the server's one ML dependency is still importable
import serving
for mod in pkgutil.iter_modules(serving.__path__):
    importlib.import_module("serving." + mod.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
assert not loaded, loaded
print("ok", len(list(pkgutil.iter_modules(serving.__path__))))
"""


def test_every_serving_module_imports_without_torch(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=ROOT,
        env=torch_blocking_env(tmp_path, blocked=WITHOUT_ONNX),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_server_serves_without_torch_or_onnx(tmp_path):
    model = build_model_folder(tmp_path / "model")
    env = torch_blocking_env(tmp_path, blocked=WITHOUT_ONNX)
    with ServerProcess(model, "--intra-op-threads", "1", tmp_dir=tmp_path, block_torch=False, env=env) as server:
        r = httpx.post(
            server.url + "/classify",
            content=encode(uniform_image(7), "PNG"),
            headers={"Content-Type": "image/png"},
            params={"confidence": 0.9},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["exit"] == 1 and r.json()["label"] == expected_label(7, 1)
        cascade = httpx.get(server.url + "/v1/model", timeout=30).json()["cascade_graph"]
        assert "not installed" in cascade["runs"]  # the fused graph needs onnx: stage by stage
    assert "blocked" not in server.log()
