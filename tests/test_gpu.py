"""CUDA-only paths (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

import pytest
import torch
from datagen import make_fashion_mnist

from training.train import cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_amp_channels_last_training_on_cuda(tmp_path):
    data = make_fashion_mnist(tmp_path / "data", n_train=256, n_test=64)
    args = [
        "--arch",
        "resnet18",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(data),
        "--width-mult",
        "0.25",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cuda",
        "--amp",
        "--channels-last",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "gpu",
    ]
    assert cli(args) == 0
    payload = torch.load(tmp_path / "gpu" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert payload["scaler"] is not None  # fp16 with loss scaling on CUDA
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


def test_cuda_execution_provider_serves_an_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from serving_model import build_model_folder

    from serving.runtime import ModelRuntime, SessionOptions

    folder = build_model_folder(tmp_path / "m")
    runtime = ModelRuntime.load(folder, SessionOptions(providers="cuda"))
    assert "CUDAExecutionProvider" in runtime.provider
