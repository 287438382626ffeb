"""benchmarks/gpu_check.sh, the prepared GPU run: its steps, their bookkeeping and result files,
exercised on the CPU (``--cpu-smoke``: the same steps, tiny, with the CPU device and provider)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow  # about a minute: a tiny training benchmark and two short server runs
def test_cpu_smoke_runs_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    summary = json.loads((out / "summary.json").read_text())
    assert result.returncode == 0, (result.stdout[-3000:], summary)
    assert [s["step"] for s in summary["steps"]] == ["pytest_gpu", "train_speed", "serve_bench"]
    assert all(s["passed"] and (out / s["log"]).is_file() for s in summary["steps"])
    assert "onnxruntime" in (out / "environment.txt").read_text()
    train = json.loads((out / "train_speed_cpu.json").read_text())
    assert train["device"] == "cpu" and train["reference_images_per_s"] > 0
    serve = json.loads((out / "serve_bench_cpu.json").read_text())
    cases = serve["throughput"]["cases"]
    assert set(cases) == {"saturation_main", "saturation_exit1", "overhead_main"}
    assert serve["throughput"]["provider"] == "CPUExecutionProvider"
    (casc,) = serve["cascade"]
    assert casc["variants"]["server"]["agreement_with_offline_rule"] == 1.0  # the served rule is the offline one
    assert casc["variants"]["server"]["cascade_ran"] in ("fused", "stages")
    # Beside the server's figure, its ORT runs alone and the same graphs without HTTP: ceilings
    # that show how much of the gap the request path makes.
    assert casc["variants"]["server"]["cascade_ort_ms"] > 0 and casc["variants"]["server"]["main_ort_ms"] > 0
    assert casc["in_process"]["cascade_ran"] in ("fused", "stages")  # chosen by timing, like the server's
    assert 0 < casc["in_process"]["main_ms"] and 0 < casc["in_process"]["cascade_ms"]
    assert isinstance(serve["throughput"]["lone_requests"]["server"]["on_event_loop"], list)
    for case in cases.values():
        assert 0 <= case["servers"]["server"]["machine_idle_share"] <= 1
    # The one-connection case in paired slices: each slice's overhead against the raw run beside it.
    (one_round,) = cases["overhead_main"]["servers"]["server"]["runs"]
    assert len(one_round["p50_overhead_ms_vs_raw_default_per_slice"]) == 2
    # What an idle server burns, read from /proc: its probes and timers, a few percent of a core; a
    # server that spun or polled while idle would show here.
    assert 0 <= serve["throughput"]["idle_cpu_share_of_a_core"]["server"] < 0.5
    # The reference server (benchmarks/least_server.py) in the same rounds, and the server against it.
    assert serve["throughput"]["least_server"] is True
    for name in ("saturation_main", "saturation_exit1"):
        assert cases[name]["servers"]["least_server"]["rps"] > 0
        assert cases[name]["servers"]["server"]["ratio_vs_least_server"] > 0
    assert "p50_ms_over_least_server" in cases["overhead_main"]["servers"]["server"]
    # What a cascade buys a loaded server: both modes under load, the test images in turn.
    loaded = casc["variants"]["server"]["at_saturation"]
    assert loaded["connections"] == 4 and loaded["errors"] == 0
    assert loaded["cascade_answers_per_s"] > 0 and 0 < loaded["gflops_saved"] < 1
    # the server, the reference server, the cascade, the cascade under load
    assert len(serve["summary"]) == 4
    assert (out / "serve_bench_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # rounds, drawn


def test_a_failing_step_is_reported_and_fails_the_run(tmp_path):
    out = tmp_path / "gpu"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "/bin/false"}  # every Python step fails at once
    result = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [s["passed"] for s in summary["steps"]] == [False, False, False]


def test_a_forgotten_out_dir_is_refused_before_anything_is_written(tmp_path):
    # "--cpu-smoke" in OUT_DIR's place: it went on in GPU mode and, with no folder, wrote into /.
    before = set(Path(ROOT).iterdir())
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "OUT_DIR first" in r.stderr, r.stderr
    r = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", str(tmp_path / "o"), "--gpu"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown mode" in r.stderr, r.stderr
    assert set(Path(ROOT).iterdir()) == before


def test_gpu_mode_without_a_gpu_fails_its_tests_and_keeps_to_its_time(tmp_path):
    # On this machine (no CUDA) the GPU mode's gpu tests must fail, not skip: a skip passed the
    # step with nothing run on the GPU. GPU_CHECK_TOTAL_S shortens the whole run's budget: steps
    # are cut to what is left of it, or not run at all, and the summary is there after each.
    out = tmp_path / "gpu"
    # The full-width export needs no GPU: built (or not, in the time left) away from the checkout.
    export = tmp_path / "full-width"
    env = {**os.environ, "GPU_CHECK_TOTAL_S": "40", "PYTHON": sys.executable, "GPU_CHECK_EXPORT_DIR": str(export)}
    started = time.monotonic()
    subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - started < 40 + 15
    steps = json.loads((out / "summary.json").read_text())["steps"]
    first = steps[0]
    assert first["step"] == "pytest_gpu" and not first["passed"]
    assert "EED_REQUIRE_GPU=1 but a CUDA device" in (out / first["log"]).read_text()
    cuda_steps = [s for s in steps if s["step"] != "full_width_export"]
    assert [s["step"] for s in cuda_steps] == ["pytest_gpu", "train_speed", "serve_bench"]
    assert not any(s["passed"] for s in cuda_steps)  # nothing here runs on CUDA
    assert all(s["seconds"] <= 40 for s in steps)
