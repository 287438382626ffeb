"""Model loading (serving.runtime), settings and the CLI, on the real fixture model."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError
from serving_model import NUM_CLASSES, ROOT, build_model_folder, free_port, policy_score

from serving.__main__ import parse_settings
from serving.errors import ModelLoadError
from serving.manifest import ManifestError
from serving.runtime import CPU, CUDA, ModelRuntime, SessionOptions, check_provider, provider_chain
from serving.sessions import provider_entries
from serving.settings import ServerSettings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def runtime(model_dir):
    rt = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))
    rt.warm_up(max_batch_size=4, runs=1)
    return rt


def test_loads_every_graph_on_cpu(runtime):
    assert runtime.provider == CPU
    assert [g.name for g in runtime.graphs] == ["exit1", "exit2", "exit3", "stage1", "stage2", "stage3"]
    assert [len(g.output_names) for g in runtime.stages] == [2, 2, 1]


def test_stage_chain_equals_full_path(runtime):
    diffs = runtime.check_consistency(batch=3)
    assert set(diffs) == {"exit1", "exit2", "exit3"} and max(diffs.values()) < 1e-5


def test_calibration_times_every_graph(runtime):
    timings = runtime.calibrate(runs=3, batch_sizes=(1, 8))
    assert set(timings) == {g.name for g in runtime.graphs}
    for samples in timings.values():
        assert [b for b, _ in samples] == [1, 1, 1, 8, 8, 8]
        assert all(t > 0 for _, t in samples)


def test_batches_of_any_size_run(runtime):
    for n in (1, 7):
        (logits,) = runtime.exits[2].run(runtime.example_input(n))
        assert logits.shape == (n, NUM_CLASSES)


def test_tampered_graph_fails_checksum(tmp_path):
    folder = build_model_folder(tmp_path / "m")
    with open(folder / "stage2.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="checksum mismatch.*stage2.onnx"):
        ModelRuntime.load(folder)


def test_manifest_that_does_not_match_graphs_fails_warm_up(tmp_path):
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["classes"].append("extra")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rt = ModelRuntime.load(folder, SessionOptions(providers="cpu"))
    with pytest.raises(ModelLoadError, match="expected \\(1, 11\\)"):
        rt.warm_up(max_batch_size=1, runs=1)


def _rewrite_graph(folder, name, edit) -> None:
    """Apply ``edit`` to graph ``name`` of ``folder`` and record its new checksum (a consistent folder)."""
    import onnx

    from serving.manifest import sha256_file

    model = onnx.load(folder / name)
    edit(model)
    onnx.save(model, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_graph_with_integer_logits_is_refused_at_load_not_served(tmp_path):
    # It loaded, and every answer came from truncated logits.
    import onnx

    def cast_logits(model):
        graph = model.graph
        graph.node[-1].output[0] = "logits_float"
        graph.node.append(onnx.helper.make_node("Cast", ["logits_float"], ["logits"], to=onnx.TensorProto.INT64))
        graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64

    folder = build_model_folder(tmp_path / "m")
    _rewrite_graph(folder, "exit1.onnx", cast_logits)
    with pytest.raises(
        ModelLoadError, match=r"exit1.onnx: logits is tensor\(int64\); the server feeds and reads float32"
    ):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))


@pytest.mark.parametrize("field, value", [("height", 32), ("channels", 3)])
def test_a_manifest_input_shape_the_graphs_do_not_take_is_named_at_load(tmp_path, field, value):
    # Found at warm-up, in ONNX Runtime's words ("Got invalid dimensions for input: image"), naming
    # neither the file nor the manifest's field.
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input"][field] = value
    if field == "channels":
        manifest["input"]["mean"], manifest["input"]["std"] = [0.5] * 3, [0.25] * 3
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"exit1.onnx takes image of shape .*input.channels, height, width"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))


def test_a_stage_that_does_not_take_its_predecessors_features_is_named_at_warm_up(tmp_path):

    def narrow_features(model):  # stage 2 now declares (and takes) one feature channel fewer
        inp = model.graph.input[0].type.tensor_type.shape.dim[1]
        inp.dim_value = inp.dim_value - 1

    folder = build_model_folder(tmp_path / "m")
    _rewrite_graph(folder, "stage2.onnx", narrow_features)
    rt = ModelRuntime.load(folder, SessionOptions(providers="cpu"))
    with pytest.raises(ModelLoadError, match=r"stage2 \(stage2.onnx\) fails on the previous stage's features"):
        rt.warm_up(max_batch_size=1, runs=1)


def test_an_unreadable_graph_or_manifest_is_named_not_a_traceback(tmp_path):
    # Read as root, a link to /proc/self/mem is a regular file whose read fails (EIO): any OSError on
    # reading a listed file was a PermissionError/OSError traceback, exit 1.
    folder = build_model_folder(tmp_path / "m")
    (folder / "stage3.onnx").unlink()
    (folder / "stage3.onnx").symlink_to("/proc/self/mem")
    with pytest.raises(ManifestError, match="stage3.onnx cannot be read .*check its permissions"):
        ModelRuntime.load(folder)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to("/proc/self/mem")
    result = _serve(["--model-dir", str(folder)])
    assert result.returncode == 2 and "manifest.json cannot be read" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("field", ["mean", "std"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_manifest_figure_that_is_not_finite_is_refused(tmp_path, field, value):
    # A NaN mean loaded, warmed and served a 500 to every request.
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["input"][field] = [value]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=f"input.{field}.0\n.*finite number"):
        ModelRuntime.load(folder)


def test_thread_counts_are_bounded():
    # Every graph has a session with threads of its own: 100,000 started 32,000 threads, never ready.
    for name in ("intra_op_threads", "inter_op_threads"):
        with pytest.raises(ValidationError, match="less than or equal to 512"):
            ServerSettings(**{name: 100_000})


def test_a_folder_whose_exits_name_each_others_graphs_is_refused(tmp_path):
    # Valid checksums, every graph loads: only the stage chain against the full paths shows that
    # exit 2 would answer with exit 3's logits while reporting exit 2's cost and accuracy.
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["exits"][1]["path"], manifest["exits"][2]["path"] = (
        manifest["exits"][2]["path"],
        manifest["exits"][1]["path"],
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rt = ModelRuntime.load(folder, SessionOptions(providers="cpu", intra_op_threads=1))
    rt.warm_up(max_batch_size=2, runs=1)
    with pytest.raises(ModelLoadError, match="full-path graph of exit2, exit3 give different logits.*export"):
        rt.check_consistency()


def _with_policy(tmp_path, thresholds=(0.5, 0.5), val=None, test=None):
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    policy = {
        "target": {"accuracy": 0.5},
        "thresholds": list(thresholds),
        "family": "shared",
        "val": val or policy_score(manifest, [0.5, 0.3, 0.2], accuracy=0.5),
        "test": test,
    }
    manifest["thresholds"] = {"rule": "r", "policies": {"cheap": policy}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


@pytest.mark.parametrize(
    "thresholds, fragment",
    [
        ([0.5], " has 1 values; the rule needs one per early exit \\(2\\)"),
        ([0.5, -0.1], " must be finite and >= 0"),
        ([0.5, float("nan")], ".1\n.*finite number"),
    ],
)
def test_a_calibrated_policy_the_rule_cannot_apply_is_refused_with_its_name(tmp_path, thresholds, fragment):
    folder, _ = _with_policy(tmp_path, thresholds)
    with pytest.raises(ManifestError, match=f"thresholds.policies.cheap.thresholds{fragment}"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))


def test_a_policy_whose_figures_are_another_models_is_refused_naming_the_remedy(tmp_path):
    folder, manifest = _with_policy(tmp_path)
    ModelRuntime.load(folder, SessionOptions(providers="cpu"))  # its own figures load
    # The same fractions with the mean cost of an export twice as dear (pasted from elsewhere).
    score = policy_score(manifest, [0.5, 0.3, 0.2], accuracy=0.5)
    score["mean_gflops"] *= 2
    folder, _ = _with_policy(tmp_path / "dear", test=score)
    with pytest.raises(ManifestError, match="cheap.test.mean_gflops .* not this model's.*training.calibrate"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))
    # Fractions of a model with another number of exits, or shares that do not add up.
    for fractions, fragment in (
        ([0.5, 0.5], "has 2 values; this model has 3 exits"),
        ([0.5, 0.3, 0.3], "must be shares .* sum to 1"),
    ):
        score = {"accuracy": 0.5, "mean_gflops": 0.001, "exit_fractions": fractions}
        folder, _ = _with_policy(tmp_path / str(len(fractions)) / fragment[:3], val=score)
        with pytest.raises(ManifestError, match=f"cheap.val.exit_fractions {fragment}"):
            ModelRuntime.load(folder, SessionOptions(providers="cpu"))


def test_a_stale_cascade_cost_is_refused_and_a_missing_one_computed(tmp_path):
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    stages = [e["stage_gflops"] for e in manifest["exits"]]
    manifest["exits"][1]["cascade_gflops"] = stages[1]  # stage 2 alone, not stages 1 + 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="exit 2: cascade_gflops .* is not the sum of stage_gflops of exits 1..2"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))
    for e in manifest["exits"]:
        del e["cascade_gflops"]  # an older export: computed
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = ModelRuntime.load(folder, SessionOptions(providers="cpu")).manifest
    assert [e.cascade_gflops for e in loaded.exits] == pytest.approx(np.cumsum(stages).tolist(), rel=1e-12)


def test_a_manifest_name_no_route_can_address_is_refused(tmp_path):
    # A hand-written name with a '/' could never be reached at /v2/models/{name}/...
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = "team/model"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="name\n.*should match pattern"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))


def test_wrong_io_names_fail_at_load(tmp_path):
    folder = build_model_folder(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["io"] = {"image_input": "pixels"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="'pixels'"):
        ModelRuntime.load(folder, SessionOptions(providers="cpu"))


def test_provider_chain():
    assert provider_chain("cpu", [CUDA, CPU]) == [CPU]
    assert provider_chain("auto", [CPU]) == [CPU]
    assert provider_chain("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert provider_chain("cuda", [CUDA, CPU]) == [CUDA, CPU]
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        provider_chain("cuda", ["AzureExecutionProvider", CPU])


def test_cuda_sessions_take_the_convolution_search_setting(tmp_path):
    # ORT's own default (EXHAUSTIVE) benchmarks cuDNN's algorithms once per input shape: once per
    # session, since the server pads GPU batches to one shape; heuristic is there for other cases.
    assert provider_entries([CUDA, CPU], SessionOptions().cuda_conv_algo_search) == [
        (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
        CPU,
    ]
    assert provider_entries([CPU], "heuristic") == [CPU]
    with pytest.raises(ValueError, match="accepted: heuristic, exhaustive, default"):
        provider_entries([CUDA, CPU], "fastest")
    s = parse_settings(["--model-dir", str(tmp_path), "--cuda-conv-algo-search", "heuristic"])
    assert SessionOptions.from_settings(s).session_keywords()["cuda_conv_algo_search"] == "heuristic"
    with pytest.raises(ValidationError, match="cuda_conv_algo_search"):
        ServerSettings(model_dir=tmp_path, cuda_conv_algo_search="fastest")


def _spinning(session) -> tuple[str, str | None, str | None]:
    """(allow_spinning, spin_duration_us, force_spinning_stop) as the session holds them; None: unset."""
    options = session.get_session_options()

    def entry(key: str) -> str | None:
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # not set: ORT's own behaviour
            return None

    return (
        entry("session.intra_op.allow_spinning"),
        entry("session.intra_op.spin_duration_us"),
        entry("session.force_spinning_stop"),
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # Bounded by default, and stopped when a run ends: every graph has threads of its own, and
        # threads still spinning after one graph's run take the cores the next graph's run needs.
        ([], ("1", str(ServerSettings.model_fields["ort_spin_us"].default), "1")),
        (["--ort-spin-us", "0"], ("0", None, None)),  # never: every operator wakes a sleeping thread
        (["--ort-spin-us", "250"], ("1", "250", "1")),
        (["--ort-keep-spinning-after-run"], ("1", str(ServerSettings.model_fields["ort_spin_us"].default), "0")),
        (["--ort-allow-spinning", "--ort-spin-us", "250"], ("1", None, None)),  # ORT's own, unbounded
    ],
)
def test_spinning_settings_reach_every_session(model_dir, flags, expected):
    # What a user sets with EED_ORT_SPIN_US / EED_ORT_ALLOW_SPINNING is what every session runs
    # with, lone-request sessions included (they are what a single request's latency comes from).
    settings = parse_settings(["--model-dir", str(model_dir), *flags])
    runtime = ModelRuntime.load(model_dir, SessionOptions.from_settings(settings))
    runtime.choose_lone_sessions(SessionOptions.from_settings(settings), rounds=1)
    sessions = [g.session for g in runtime.graphs] + [g.lone_session for g in runtime.graphs if g.lone_session]
    assert len(sessions) >= len(runtime.graphs) > 0
    assert {_spinning(s) for s in sessions} == {expected}


def test_session_options_default_to_the_servers_settings(tmp_path):
    # Code that opens the server's graphs without a settings object (benchmarks timing "raw ORT
    # with the server's options", in-process checks) must run what a default server runs: a
    # bare SessionOptions() that spun less than the server once made serve_bench's baseline
    # for the server's options 0.3-0.5 ms slower at batch 1 than the server's own sessions.
    assert SessionOptions(providers="cpu") == SessionOptions.from_settings(
        ServerSettings(model_dir=tmp_path, providers="cpu")
    )


def test_negative_spin_duration_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="ort_spin_us"):
        ServerSettings(model_dir=tmp_path, ort_spin_us=-1)


def test_silent_cuda_fallback_is_an_error_unless_allowed(caplog):
    with pytest.raises(ModelLoadError, match="EED_ALLOW_PROVIDER_FALLBACK"):
        check_provider("cuda", [CUDA, CPU], CPU, allow_fallback=False)
    with caplog.at_level(logging.WARNING):
        check_provider("cuda", [CUDA, CPU], CPU, allow_fallback=True)
        check_provider("auto", [CUDA, CPU], CPU, allow_fallback=False)
    assert caplog.text.count("ONNX Runtime is using CPUExecutionProvider") == 2
    check_provider("cuda", [CUDA, CPU], CUDA, allow_fallback=False)


def test_settings_from_env_and_cli(monkeypatch, tmp_path):
    monkeypatch.setenv("EED_PORT", "9123")
    monkeypatch.setenv("EED_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("EED_DEFAULT_POLICY", "confidence:0.8")
    s = parse_settings(
        [
            "--model-dir",
            str(tmp_path),
            "--max-batch-size",
            "4",
            "--allow-provider-fallback",
            "--providers",
            "cpu",
            "--max-wait-ms",
            "0.5",
        ]
    )
    assert (s.port, s.max_batch_size, s.allow_provider_fallback) == (9123, 4, True)
    assert (s.providers, s.max_wait_ms) == ("cpu", 0.5)
    assert s.default_policy_params.confidence == (0.8,)
    monkeypatch.setenv("EED_MODEL_DIR", str(tmp_path))
    assert ServerSettings().model_dir == tmp_path


def test_bad_default_policy_is_refused_at_settings_time(tmp_path):
    with pytest.raises(ValidationError, match="key:value"):
        ServerSettings(model_dir=tmp_path, default_policy="fastest")


def test_server_deadline_cannot_pin_a_fixed_default_exit(tmp_path):
    with pytest.raises(ValidationError, match="default_budget_ms cannot be combined"):
        ServerSettings(model_dir=tmp_path, default_policy="exit:2", default_budget_ms=50)
    assert ServerSettings(model_dir=tmp_path, default_policy="exit:last", default_budget_ms=50).default_budget_ms == 50


def test_contradictory_or_non_finite_settings_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValidationError, match="max_batch_size \\(64\\) cannot exceed queue_size \\(4\\)"):
        ServerSettings(model_dir=tmp_path, max_batch_size=64, queue_size=4)
    # queue_size alone: the default batch size follows it down (a batch holds admitted requests).
    assert ServerSettings(model_dir=tmp_path, queue_size=4).max_batch_size == 4
    with pytest.raises(ValidationError, match="must exceed deadline_margin_ms \\(10\\)"):
        ServerSettings(model_dir=tmp_path, default_budget_ms=5, deadline_margin_ms=10)
    for field in ("deadline_margin_ms", "body_timeout_s", "feedback_max_age_s", "inline_max_ms"):
        with pytest.raises(ValidationError, match=f"{field}\n.*finite number"):
            ServerSettings(model_dir=tmp_path, **{field: "inf"})


def _serve(args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(free_port()), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_cli_refuses_a_folder_without_manifest_at_once(tmp_path):
    result = _serve(["--model-dir", str(tmp_path)])
    assert result.returncode == 2 and "manifest.json" in result.stderr


def test_cli_names_a_host_or_port_it_cannot_listen_on_before_loading(model_dir):
    from serving.__main__ import cannot_listen

    # What uvicorn (asyncio's create_server) listens on passes: '' is every interface.
    assert cannot_listen("", 0) is None and cannot_listen("127.0.0.1", 0) is None
    result = _serve(["--model-dir", str(model_dir), "--host", "no such host"])
    assert result.returncode == 2 and "cannot listen on no such host:" in result.stderr
    assert "does not resolve" in result.stderr and "--host/EED_HOST" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(["--model-dir", str(model_dir), "--port", str(port)])  # the later --port wins
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_cli_exits_when_cuda_is_required_but_unavailable(model_dir):
    import onnxruntime

    if CUDA in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal is tested where it has not")
    result = _serve(["--model-dir", str(model_dir), "--providers", "cuda"])
    assert result.returncode == 1
    assert "CUDAExecutionProvider" in result.stderr and "onnxruntime-gpu" in result.stderr


def test_cli_refuses_a_default_policy_the_model_cannot_run_before_loading_it(model_dir):
    # Known from the manifest's costs and policies: refused as the setting it is (status 2), before
    # the graphs load and warm (it was found after, and reported as a load failure, status 1).
    for policy, fragment in (("exit:9", "exit=9 is out of range"), ("policy:nope", "unknown policy 'nope'")):
        result = _serve(["--model-dir", str(model_dir), "--default-policy", policy])
        assert result.returncode == 2, result.stderr
        assert f"default_policy '{policy}' does not fit" in result.stderr and fragment in result.stderr
        assert "warm" not in result.stderr.lower() and "Uvicorn running" not in result.stderr


def test_cli_exits_when_the_default_deadline_is_below_exit_1(model_dir):
    # Every plain request runs under it: started, the server would answer each with a 422 about a
    # budget_ms its client never sent.
    # (No margin: a deadline within the margin is refused earlier, with the settings.)
    result = _serve(["--model-dir", str(model_dir), "--default-budget-ms", "0.0001", "--deadline-margin-ms", "0"])
    assert result.returncode == 1
    assert "default_budget_ms=0.0001 does not fit this model" in result.stderr and "exit 1" in result.stderr


def test_cli_help_lists_every_setting():
    result = subprocess.run(
        [sys.executable, "-m", "serving", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout, name


def test_example_input_is_deterministic(runtime):
    assert np.array_equal(runtime.example_input(2, seed=5), runtime.example_input(2, seed=5))


def _asgi_client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_readyz_is_503_until_the_model_is_loaded(model_dir):
    import asyncio

    from serving.app import create_app, load_model

    async def main():
        app = create_app(ServerSettings(model_dir=model_dir, intra_op_threads=1))
        state = app.state.eed
        async with _asgi_client(app) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok", "phase": "starting"}
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["Retry-After"] == "1"
            r = await client.post("/classify", content=b"x", headers={"Content-Type": "image/png"})
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            await load_model(state)  # what the lifespan runs in the background
            try:
                assert (await client.get("/readyz")).status_code == 200
            finally:
                await state.service.stop()

    asyncio.run(main())


def test_a_loaded_server_keeps_its_long_lived_objects_out_of_the_collector(model_dir):
    # A full collection under load would otherwise walk every module, session and route
    # object, with every request in flight waiting (36 ms on the full-width export).
    import asyncio
    import gc

    from serving.app import create_app, load_model

    async def main():
        app = create_app(ServerSettings(model_dir=model_dir, intra_op_threads=1))
        gc.unfreeze()  # whatever an earlier test froze
        assert gc.get_freeze_count() == 0
        await load_model(app.state.eed)
        try:
            return gc.get_freeze_count()
        finally:
            await app.state.eed.service.stop()
            gc.unfreeze()

    assert asyncio.run(main()) > 10_000


def test_a_sigterm_during_the_load_leaves_the_ready_gauge_at_0(model_dir):
    # The drain set eed_model_ready to 0 while the model was still warming up; the end of the
    # load must not set it back to 1 while /readyz answers 503.
    import asyncio
    import gc

    from serving.app import create_app, load_model

    async def main():
        app = create_app(ServerSettings(model_dir=model_dir, warmup_runs=1, calibration_runs=2))
        state = app.state.eed
        state.draining = True  # what the SIGTERM handler does (serving.__main__.mark_draining)
        state.metrics.ready.set(0)
        await load_model(state)
        try:
            async with _asgi_client(app) as client:
                assert (await client.get("/readyz")).status_code == 503
                assert "eed_model_ready 0.0" in (await client.get("/metrics")).text
        finally:
            await state.service.stop()
            gc.unfreeze()

    asyncio.run(main())


def test_load_failure_is_reported_by_readyz(model_dir):
    import asyncio

    from serving.app import create_app, load_model

    async def main():
        failures = []
        app = create_app(ServerSettings(model_dir=model_dir, default_policy="budget_gflops:0.0000001"))
        app.state.eed.on_load_failure = failures.append
        await load_model(app.state.eed)
        async with _asgi_client(app) as client:
            r = await client.get("/readyz")
            assert r.status_code == 503 and "failed to load" in r.json()["detail"]
            assert "below the cheapest exit" in r.json()["detail"]
            assert (await client.get("/healthz")).json()["phase"] == "failed"
        assert failures and "default_policy" in failures[0]

    asyncio.run(main())


def test_a_small_image_is_answered_without_a_worker_thread(model_dir, monkeypatch):
    # Every step of a /classify request for a small image runs on the event loop, except the
    # model itself (the inference executor): no route dependency or handler is sent to
    # Starlette's worker threads (a plain `def` dependency would be, on every request).
    import asyncio

    import anyio.to_thread
    from serving_model import encode, uniform_image

    from serving.app import create_app, load_model

    hops = []
    real = anyio.to_thread.run_sync

    async def counting(*args, **kwargs):
        hops.append(getattr(args[0], "__qualname__", repr(args[0])))
        return await real(*args, **kwargs)

    async def main():
        app = create_app(ServerSettings(model_dir=model_dir, intra_op_threads=1))
        state = app.state.eed
        await load_model(state)
        try:
            async with _asgi_client(app) as client:
                monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
                for params in ({"exit": 1}, {"confidence": 0.9}, {"budget_ms": 60_000}):
                    r = await client.post(
                        "/classify",
                        content=encode(uniform_image(3), "PNG"),
                        headers={"Content-Type": "image/png"},
                        params=params,
                    )
                    assert r.status_code == 200, r.text
                assert (await client.get("/v1/model")).status_code == 200
        finally:
            await state.service.stop()

    asyncio.run(main())
    assert hops == []


def test_a_lone_request_runs_its_short_graph_on_the_event_loop_unless_inline_is_off(model_dir):
    # Alone on the server, a request skips the queue; a graph that takes at most inline_max_ms runs
    # on the event loop itself (no hand-off to the inference thread and back), a longer one in it.
    import asyncio
    import threading

    from serving.metrics import ServingMetrics
    from serving.policy import PolicyParams
    from serving.service import InferenceService

    one_thread = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))

    async def main(inline_max_ms, runtime=one_thread):
        service = InferenceService(runtime, ServingMetrics(), probe_interval_s=0, inline_max_ms=inline_max_ms)
        service.seed_latency(runtime.calibrate(runs=2))
        await service.start()
        lone, threads = service.exit_workers[0].lone, []
        real = lone.run
        lone.run = lambda batch: (threads.append(threading.get_ident()), real(batch))[1]
        try:
            x = runtime.example_input(1)[0]
            with service.admit() as ticket:
                outcome = await service.run(x, service.plan(PolicyParams(exit=1)), ticket)
        finally:
            await service.stop()
        np.testing.assert_allclose(outcome.probs.sum(), 1.0, rtol=1e-6)
        return threads, threading.get_ident(), [w.lone.inline for w in service.exit_workers], service

    threads, loop_thread, inline, service = asyncio.run(main(inline_max_ms=1000.0))
    assert inline == [True] * 3 and threads == [loop_thread]
    assert service.lone_on_event_loop() == [g.name for g in one_thread.exits + one_thread.stages]  # /v1/model
    threads, loop_thread, inline, service = asyncio.run(main(inline_max_ms=0.0))
    assert inline == [False] * 3 and len(threads) == 1 and threads != [loop_thread]
    assert service.lone_on_event_loop() == []
    # A session that splits a run across threads too: the loop is ORT's calling thread.
    two_threads = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=2))
    threads, loop_thread, inline, service = asyncio.run(main(inline_max_ms=1000.0, runtime=two_threads))
    assert inline == [True] * 3 and threads == [loop_thread]


def test_one_slow_calibration_run_does_not_send_lone_requests_off_the_event_loop(model_dir):
    # The graph's own cost decides (its fastest lone run), not the mean nor the median: a stall
    # during start-up (a busy neighbour) must not cost every later lone request the thread hand-off.
    from serving.metrics import ServingMetrics
    from serving.service import InferenceService

    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))
    timings = {g.name: [(1, 0.006)] * 4 + [(1, 0.060)] * 6 + [(8, 0.040)] * 10 for g in runtime.graphs}
    service = InferenceService(runtime, ServingMetrics(), probe_interval_s=0, inline_max_ms=10.0)
    service.seed_latency(timings)
    assert service.service_models[runtime.exits[0].name].estimate(1) > 0.010  # the mean is past the limit
    assert service.lone_on_event_loop() == [g.name for g in runtime.exits + runtime.stages]
    slow = {name: [(1, 0.012)] * 10 + [(8, 0.040)] * 10 for name in timings}
    service = InferenceService(runtime, ServingMetrics(), probe_interval_s=0, inline_max_ms=10.0)
    service.seed_latency(slow)
    assert service.lone_on_event_loop() == []  # never within it: the inference thread


def test_a_model_calibrated_under_another_rule_is_named_at_start(model_dir, tmp_path, caplog):
    """The server applies its own cascade rule; figures recorded under an older one may not match its
    answers (the shipped model's 1e-12 tie slack): the log says so and what refreshes them."""
    import asyncio
    import json
    import shutil

    from serving_model import with_calibrated_policy

    from serving.app import create_app, load_model

    folder = with_calibrated_policy(shutil.copytree(model_dir, tmp_path / "model"))

    def start() -> list[str]:
        caplog.clear()

        async def main():
            app = create_app(ServerSettings(model_dir=folder, intra_op_threads=1))
            await load_model(app.state.eed)
            await app.state.eed.service.stop()

        with caplog.at_level(logging.WARNING, logger="serving"):
            asyncio.run(main())
        return [r.getMessage() for r in caplog.records if "another cascade rule" in r.getMessage()]

    assert start() == []
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["thresholds"]["rule"] = "an older rule"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (warning,) = start()
    assert "'an older rule'" in warning and f"python -m training.calibrate {folder}" in warning


def test_an_unexpected_error_in_classify_is_a_json_500_with_the_request_id(model_dir, caplog):
    # /classify runs past Starlette's error middleware (serving.app.DirectRoutes): a bug there must
    # still answer like every other route — the app's JSON 500, the request id, the traceback logged.
    import asyncio

    from serving.app import create_app, load_model

    async def main():
        app = create_app(ServerSettings(model_dir=model_dir, intra_op_threads=1))
        state = app.state.eed
        await load_model(state)

        def broken(data, content_type):
            raise RuntimeError("a bug in preprocessing")

        state.preprocess = broken
        try:
            async with _asgi_client(app) as client:
                return await client.post(
                    "/classify", content=b"\x89PNG", headers={"Content-Type": "image/png", "X-Request-ID": "bug-2"}
                )
        finally:
            await state.service.stop()

    with caplog.at_level(logging.ERROR, logger="serving"):
        r = asyncio.run(main())
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "bug-2"
    assert r.headers["Connection"] == "close"  # uvicorn closes it after a 500: the client is told
    assert r.json() == {"error": "internal_error", "detail": "the server failed on this request; see the server log"}
    assert any("a bug in preprocessing" in (rec.exc_text or str(rec.exc_info)) for rec in caplog.records)


def test_lone_requests_get_one_thread_sessions_only_when_they_measure_faster(model_dir):
    # The choice is by timing; min_gain pins it either way so that both outcomes are checked (-1.0 took one
    # thread only up to twice as slow as all cores, which a loaded host exceeded: any ratio now).
    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu"))
    assert runtime.choose_lone_sessions(SessionOptions(providers="cpu"), min_gain=1.0, rounds=1).startswith(
        "the same sessions as batches (main exit at batch 1:"
    )
    assert all(g.lone_session is None for g in runtime.graphs)
    reason = runtime.choose_lone_sessions(SessionOptions(providers="cpu"), min_gain=-1e9, rounds=1)
    assert reason.startswith("one-thread sessions (main exit at batch 1:") and "ms on one thread" in reason
    assert all(g.lone_session is not None for g in runtime.graphs)
    from serving.fused import attach_fused_cascade

    attach_fused_cascade(runtime, "fused", SessionOptions(providers="cpu"), max_batch_size=4)
    assert runtime.fused is not None and runtime.fused.lone_session is not None  # built after the choice
    x = runtime.example_input(1, seed=4)
    inputs = runtime.stage_inputs(x)
    for graph in runtime.graphs:  # the same answers either way (the fused cascade included)
        feed = graph.feed(x, inputs)
        for alone, batched in zip(graph.run_alone(feed), graph.run(feed)):
            np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-5)
    configured = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=2))
    assert "configured" in configured.choose_lone_sessions(SessionOptions(providers="cpu", intra_op_threads=2))
    assert all(g.lone_session is None for g in configured.graphs)


def test_spinning_benchmark_compares_the_servers_option_sets(model_dir, tmp_path, capsys):
    # benchmarks/ort_spinning.py is what the README's spinning figures come from: it must run on
    # any model folder and report every option set the server offers, against "off".
    from benchmarks import ort_spinning

    out = tmp_path / "spin.json"
    report = ort_spinning.main(["--model", str(model_dir), "--rounds", "1", "--seconds", "0.05", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["medians"]) == set(ort_spinning.OPTION_SETS)
    for figures in report["medians"].values():
        assert figures["batch32_img_s"] > 0 and figures["batch1_p50_ms"] > 0
        assert figures["stage_chain_b1_p50_ms"] > 0 and figures["main_after_chain_b1_p50_ms"] > 0
    assert "x off" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ort_spinning.main(["--model", str(tmp_path), "--out", str(out)])
    assert "untrained_export.py" in capsys.readouterr().err


def test_lone_requests_return_to_the_event_loop_once_live_runs_are_fast_again(model_dir):
    # A stall through every calibration run must not decide for the process's whole life: live lone
    # runs keep judging where the next one runs (the fastest of the recent ones against the limit).
    import asyncio

    from serving.batching import LONE_RUNS_REMEMBERED
    from serving.metrics import ServingMetrics
    from serving.policy import PolicyParams
    from serving.service import InferenceService

    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu", intra_op_threads=1))
    stalled = {g.name: [(1, 5.0)] * 10 + [(8, 9.0)] * 10 for g in runtime.graphs}  # every run 5 s
    service = InferenceService(runtime, ServingMetrics(), probe_interval_s=0, inline_max_ms=1000.0)
    service.seed_latency(stalled)
    assert service.lone_on_event_loop() == []  # judged by start-up alone: the inference thread
    exit1 = runtime.exits[0].name

    async def lone_requests(n: int) -> None:
        await service.start()
        try:
            for _ in range(n):
                with service.admit() as ticket:
                    await service.run(runtime.example_input(1)[0], service.plan(PolicyParams(exit=1)), ticket)
                await asyncio.sleep(0)  # the bookkeeping after each answer
        finally:
            await service.stop()

    asyncio.run(lone_requests(1))
    assert exit1 in service.lone_on_event_loop()  # one real run (ms) among the remembered ones
    assert service.exit_workers[1].lone.inline is False  # graphs not run since: still judged by start-up

    # And the other way: a graph that stays slower than the limit leaves the loop once its fast runs
    # have aged out of the remembered ones.
    lone = service.exit_workers[0].lone
    for _ in range(LONE_RUNS_REMEMBERED - 1):
        lone.observe(5.0)
    assert lone.inline is True
    lone.observe(5.0)
    assert lone.inline is False


def test_the_one_thread_choice_follows_the_fastest_recent_timings_each_way():
    from serving.runtime import LONE_TIMINGS_REMEMBERED, LoneThreadsJudge

    judge = LoneThreadsJudge(min_gain=0.1)
    # Start-up beside a busy neighbour: all-core runs stalled, one-thread runs less so.
    judge.observe(False, 0.015)
    judge.observe(True, 0.012)
    assert judge.prefers_one_thread(now_one_thread=False) is True
    # Quiet again: one quiet all-core timing is the way's own cost, and it wins.
    judge.observe(False, 0.007)
    assert judge.prefers_one_thread(now_one_thread=True) is False
    judge.observe(False, 0.016)  # a busy moment only adds
    assert judge.prefers_one_thread(now_one_thread=False) is False
    # Until the quiet timing has aged out and the all-core way stays slow for as long.
    for _ in range(LONE_TIMINGS_REMEMBERED - 1):
        judge.observe(False, 0.016)
    assert judge.prefers_one_thread(now_one_thread=False) is True
    assert "12.000 ms on one thread vs 16.000 ms on all cores" in judge.detail()
    # Near the threshold lone requests stay where they are: taken at 10 % faster, left at 0 %.
    judge = LoneThreadsJudge(min_gain=0.1)
    judge.observe(False, 0.010)
    judge.observe(True, 0.0095)
    assert judge.prefers_one_thread(now_one_thread=True) is True
    assert judge.prefers_one_thread(now_one_thread=False) is False


@pytest.mark.parametrize("traffic", ["idle", "steady"])
def test_one_thread_lone_sessions_chosen_at_a_busy_start_are_rejudged_while_idle(model_dir, monkeypatch, traffic):
    # A replica that chose one-thread sessions while its neighbour was starting must not keep
    # them for life: the idle prober times both ways again and lone requests follow the faster —
    # also under a steady stream of one request at a time, which leaves no lull for other probes.
    import asyncio

    from serving.fused import attach_fused_cascade
    from serving.metrics import ServingMetrics
    from serving.policy import PolicyParams
    from serving.runtime import LoneThreadsJudge
    from serving.service import InferenceService

    runtime = ModelRuntime.load(model_dir, SessionOptions(providers="cpu"))
    runtime.choose_lone_sessions(SessionOptions(providers="cpu"), min_gain=-1e9, rounds=1)  # one thread
    attach_fused_cascade(runtime, "fused", SessionOptions(providers="cpu"), max_batch_size=4)
    one_thread = {g.name: g.lone_session for g in runtime.graphs}
    assert runtime.lone_on_one_thread and all(one_thread.values()) and "cascade" in one_thread
    assert runtime.time_lone_way(True) > 0 and runtime.time_lone_way(False) > 0  # the real timing
    runtime.lone_judge = LoneThreadsJudge(min_gain=0.1)
    runtime.lone_judge.observe(False, 0.050)  # what a busy start-up measured
    runtime.lone_judge.observe(True, 0.010)
    host = {False: 0.001, True: 0.002}  # what the host gives now: all cores twice as fast
    timed = []

    def time_lone_way(one_thread: bool) -> float:
        timed.append((one_thread, service.inflight, list(service.exit_workers[-1].running)))
        return host[one_thread]

    monkeypatch.setattr(runtime, "time_lone_way", time_lone_way)
    service = InferenceService(runtime, ServingMetrics(), probe_interval_s=0.01)
    service.seed_latency(runtime.calibrate(2, (1, 4)))
    x = runtime.example_input(1, seed=3)

    async def idle_until(condition) -> np.ndarray:
        for _ in range(100):
            if traffic == "idle":
                await asyncio.sleep(0.05)
            else:
                for _ in range(10):
                    await service.run(x[0], service.plan(PolicyParams(exit=1)))
                    await asyncio.sleep(0.005)
            if condition():
                break
        with service.admit() as ticket:
            return (await service.run(x[0], service.plan(PolicyParams(exit=2)), ticket)).logits

    async def main():
        await service.start()
        try:
            logits = await idle_until(lambda: not runtime.lone_on_one_thread)
            moved = not runtime.lone_on_one_thread and all(g.lone_session is None for g in runtime.graphs)
            reason = runtime.lone_sessions
            # And back, once one thread is the faster way again: the same sessions, not new ones.
            for _ in range(10):
                runtime.lone_judge.observe(False, 0.004)
            host.update({False: 0.004, True: 0.002})
            await idle_until(lambda: runtime.lone_on_one_thread)
            return logits, moved, reason
        finally:
            await service.stop()

    logits, moved, reason = asyncio.run(main())
    assert moved and reason.startswith("the same sessions as batches (re-judged while idle")
    np.testing.assert_allclose(logits, runtime.exits[1].run(x)[0][0], rtol=1e-5, atol=1e-5)
    assert {g.name: g.lone_session for g in runtime.graphs} == one_thread
    assert runtime.lone_sessions.startswith("one-thread sessions (re-judged while idle")
    # Each timing ran in a lull (nothing admitted at the tick that started it: each idle_until's last,
    # admitted request may be admitted between that tick and the timing's start in the inference
    # thread, twice in all), and in the main exit's running list meanwhile (so queueing estimates count
    # it); the all-core way first, then the two in turn.
    assert timed and all(len(running) == 1 for _, _, running in timed)
    assert sum(inflight == 0 for _, inflight, _ in timed) >= len(timed) - 2, timed
    assert [way for way, _, _ in timed[:2]] == [False, True]


def test_the_service_defaults_are_the_servers_settings():
    # InferenceService is built from ServerSettings by the server and directly by tests and
    # benchmarks: its keyword defaults must be the settings' own, or a direct caller measures
    # another server than the one users run.
    import inspect

    from serving.service import InferenceService

    defaults = {
        name: p.default
        for name, p in inspect.signature(InferenceService.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name in ServerSettings.model_fields
    }
    assert len(defaults) >= 9
    assert defaults == {name: ServerSettings.model_fields[name].default for name in defaults}
    # The other places a setting's default is written out: the fused graph's batch size and the
    # live estimates' half-life.
    from serving.fused import attach_fused_cascade
    from serving.latency import DecayingMean, ServiceTimeModel

    settings = ServerSettings.model_fields
    assert inspect.signature(attach_fused_cascade).parameters["max_batch_size"].default == (
        settings["max_batch_size"].default
    )
    for cls in (ServiceTimeModel, DecayingMean):
        assert inspect.signature(cls).parameters["half_life_s"].default == settings["estimate_half_life_s"].default
