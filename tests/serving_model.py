"""A tiny, real multi-exit model folder for the serving tests, built without torch.

``build_model_folder(dir)`` writes ``exit{i}.onnx``, ``stage{i}.onnx`` and a
``manifest.json`` (real sha256 checksums and costs computed from the layers) in the
shape the exporter produces: 3 exits, 1×28×28 input (or 3 channels), 10 classes.

The weights are chosen so that behaviour on *uniform gray* images is known in
closed form, which lets tests check which exit answered and why:

* Every stage is a 2×2 stride-2 convolution + ReLU whose 41 output channels are
  ``relu(b − j/40)`` for j = 0..40, where b is the local brightness in [0, 1]
  (after undoing the manifest's mean/std normalisation inside the first conv).
  Channel 0 carries b itself to the next stage. Each head is global average
  pooling + one Gemm; with the ReLU basis it realises any piecewise-linear function
  of b with knots every 1/40.
* A uniform image of gray level ``gray_for_bin(c)`` (brightness bin c = 0..9)
  makes exit i predict class ``(c + i − 1) % 10`` — each exit has its own answer,
  so a response's label proves which exit produced it.
* Exit 1 is confident (top probability ≈ 0.997) only for bins c ≥ 7, exit 2 for
  c ≥ 4, exit 3 always; otherwise the top probability is ≈ 0.23. A cascade with
  threshold 0.9 therefore stops at exit 1 for bins 7–9, exit 2 for bins 4–6 and
  exit 3 for bins 0–3.

Stage graphs and full-path graphs share the same weights and ops, so the stage
chain equals the full path exactly.

Run as a script to write a folder: ``python tests/serving_model.py OUT_DIR``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.cascade import RULE
from serving.manifest import ExitSpec, InputSpec, Manifest, sha256_file, write_manifest

ROOT = Path(__file__).resolve().parents[1]

NUM_EXITS = 3
NUM_CLASSES = 10
KNOTS = 40  # ReLU basis knots at j / KNOTS, j = 0..KNOTS
WIDTH = KNOTS + 1
CONFIDENT_SCALE = 8.0
UNSURE_SCALE = 1.0
# Exit i is confident for brightness bins >= CONFIDENT_FROM[i - 1].
CONFIDENT_FROM = (7, 4, 0)
CLASSES = [f"class-{c}" for c in range(NUM_CLASSES)]
MEAN, STD = 0.5, 0.5
OPSET = 17
IR_VERSION = 8


def gray_for_bin(c: int) -> int:
    """The 8-bit gray level at the centre of brightness bin c (0..9)."""
    return int(round(255 * (4 * c + 2) / KNOTS))


def expected_label(c: int, exit_number: int) -> int:
    """Class predicted by ``exit_number`` on a uniform image of bin c."""
    return (c + exit_number - 1) % NUM_CLASSES


def confident(c: int, exit_number: int) -> bool:
    """Whether exit ``exit_number`` is confident (p ≈ 0.997) on bin c."""
    return c >= CONFIDENT_FROM[exit_number - 1]


def cascade_exit(c: int, threshold: float = 0.9, deepest: int = NUM_EXITS) -> int:
    """The exit a confidence cascade answers from on bin c (0.23 < threshold ≤ 0.99)."""
    for i in range(1, deepest + 1):
        if confident(c, i):
            return i
    return deepest


def top_probability(c: int, exit_number: int) -> float:
    """Top softmax probability of that exit on bin c (exactly, at the bin centre)."""
    s = CONFIDENT_SCALE if confident(c, exit_number) else UNSURE_SCALE
    return float(np.exp(s) / (np.exp(s) + NUM_CLASSES - 1))


def _head_weights(exit_number: int) -> tuple[np.ndarray, np.ndarray]:
    """Gemm weights (classes × WIDTH) and bias realising this exit's logits as PL in b."""
    values = np.zeros((KNOTS + 1, NUM_CLASSES))
    for k in range(KNOTS + 1):
        c = min(k // 4, NUM_CLASSES - 1)
        scale = CONFIDENT_SCALE if confident(c, exit_number) else UNSURE_SCALE
        values[k, expected_label(c, exit_number)] = scale
    slopes = np.diff(values, axis=0) * KNOTS  # segment j: between knots j and j+1
    coeff = np.zeros((WIDTH, NUM_CLASSES))
    coeff[0] = slopes[0]
    coeff[1:KNOTS] = slopes[1:] - slopes[:-1]
    coeff[KNOTS] = -slopes[-1]  # flat beyond b = 1
    return coeff.T.astype(np.float32), values[0].astype(np.float32)


def _stage_conv(stage: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """2×2 stride-2 conv weights producing relu(b − j/KNOTS) in channel j."""
    thresholds = np.arange(WIDTH) / KNOTS
    if stage == 1:
        # Input is (pixel/255 − MEAN)/STD; recover b = x·STD + MEAN while averaging.
        w = np.full((WIDTH, channels, 2, 2), STD / (4 * channels), dtype=np.float32)
        b = (MEAN - thresholds).astype(np.float32)
    else:
        w = np.zeros((WIDTH, WIDTH, 2, 2), dtype=np.float32)
        w[:, 0] = 0.25  # average channel 0, which carries b
        b = (-thresholds).astype(np.float32)
    return w, b


def _stage_nodes(stage: int, inp: str, out: str, inits: dict, channels: int) -> list:
    w, b = _stage_conv(stage, channels)
    inits[f"s{stage}_w"], inits[f"s{stage}_b"] = w, b
    return [
        helper.make_node(
            "Conv",
            [inp, f"s{stage}_w", f"s{stage}_b"],
            [f"s{stage}_conv"],
            kernel_shape=[2, 2],
            strides=[2, 2],
            name=f"stage{stage}_conv",
        ),
        helper.make_node("Relu", [f"s{stage}_conv"], [out], name=f"stage{stage}_relu"),
    ]


def _head_nodes(exit_number: int, inp: str, out: str, inits: dict) -> list:
    w, b = _head_weights(exit_number)
    inits[f"h{exit_number}_w"], inits[f"h{exit_number}_b"] = w, b
    return [
        helper.make_node("GlobalAveragePool", [inp], [f"h{exit_number}_gap"], name=f"head{exit_number}_gap"),
        helper.make_node("Flatten", [f"h{exit_number}_gap"], [f"h{exit_number}_flat"], axis=1),
        helper.make_node(
            "Gemm",
            [f"h{exit_number}_flat", f"h{exit_number}_w", f"h{exit_number}_b"],
            [out],
            transB=1,
            name=f"head{exit_number}_fc",
        ),
    ]


def _spatial(stage: int) -> int:
    size = 28
    for _ in range(stage):
        size //= 2
    return size


def _model(name: str, nodes: list, inits: dict, inp: tuple[str, list], outputs: list[tuple[str, list]]):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="serving-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _macs(channels: int) -> tuple[list[int], int]:
    """Multiply-accumulates of each stage conv and of one head Gemm."""
    stage = []
    for s in range(1, NUM_EXITS + 1):
        cin = channels if s == 1 else WIDTH
        stage.append(WIDTH * _spatial(s) ** 2 * cin * 4)
    return stage, WIDTH * NUM_CLASSES


def build_model_folder(out: str | Path, channels: int = 1, name: str = "tiny-test", **input_extra) -> Path:
    """Write the fixture model folder to ``out`` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    batch = "N"
    image = ("image", [batch, channels, 28, 28])
    logits = ("logits", [batch, NUM_CLASSES])

    def features(s):
        return [batch, WIDTH, _spatial(s), _spatial(s)]

    for i in range(1, NUM_EXITS + 1):
        # Full path: stages 1..i then head i.
        inits: dict = {}
        nodes, prev = [], "image"
        for s in range(1, i + 1):
            nodes += _stage_nodes(s, prev, f"f{s}", inits, channels)
            prev = f"f{s}"
        nodes += _head_nodes(i, prev, "logits", inits)
        onnx.save(_model(f"exit{i}", nodes, inits, image, [logits]), out / f"exit{i}.onnx")

        # Stage graph: features of stage i-1 (or the image) → logits i (+ features i).
        inits = {}
        inp = image if i == 1 else ("features_in", features(i - 1))
        feat_out = "features_out" if i < NUM_EXITS else "f_last"
        nodes = _stage_nodes(i, inp[0], feat_out, inits, channels) + _head_nodes(i, feat_out, "logits", inits)
        outputs = [logits] + ([("features_out", features(i))] if i < NUM_EXITS else [])
        onnx.save(_model(f"stage{i}", nodes, inits, inp, outputs), out / f"stage{i}.onnx")

    stage_macs, head_macs = _macs(channels)
    conv_params = [WIDTH * (channels if s == 1 else WIDTH) * 4 + WIDTH for s in range(1, NUM_EXITS + 1)]
    head_params = WIDTH * NUM_CLASSES + NUM_CLASSES
    exits = []
    for i in range(1, NUM_EXITS + 1):
        exits.append(
            ExitSpec(
                exit=i,
                gflops=2 * (sum(stage_macs[:i]) + head_macs) / 1e9,
                stage_gflops=2 * (stage_macs[i - 1] + head_macs) / 1e9,
                head_gflops=2 * head_macs / 1e9,
                params=sum(conv_params[:i]) + head_params,
                accuracy=round(0.70 + 0.1 * i, 3),
                path=f"exit{i}.onnx",
                stage=f"stage{i}.onnx",
            )
        )
    files = {
        f"{kind}{i}.onnx": sha256_file(out / f"{kind}{i}.onnx")
        for i in range(1, NUM_EXITS + 1)
        for kind in ("exit", "stage")
    }
    manifest = Manifest(
        name=name,
        arch="tiny-relu-basis",
        dataset="synthetic-brightness",
        classes=CLASSES,
        input=InputSpec(
            channels=channels, height=28, width=28, mean=[MEAN] * channels, std=[STD] * channels, **input_extra
        ),
        exits=exits,
        files=files,
        provenance={"command": "tests/serving_model.py", "note": "hand-set weights, not trained"},
    )
    write_manifest(manifest, out)
    return out


def policy_score(manifest: dict, exit_fractions: list[float], accuracy: float) -> dict:
    """A policy's figures on one split, its mean cost the fractions at ``manifest``'s cascade costs."""
    costs = [e["cascade_gflops"] for e in manifest["exits"]]
    mean = sum(f * c for f, c in zip(exit_fractions, costs, strict=True))
    return {"accuracy": accuracy, "mean_gflops": mean, "exit_fractions": exit_fractions}


def with_calibrated_policy(model_dir):
    """Add a calibrated policy to the fixture manifest: per-exit thresholds 0.99 (exit 1), 0.5 (exit 2)."""
    import json

    path = Path(model_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    score = policy_score(manifest, [0.3, 0.3, 0.4], accuracy=0.9)
    manifest["thresholds"] = {
        "rule": RULE,
        "policies": {
            "half": {"target": {"mean_gflops": 0.0005}, "thresholds": [0.99, 0.5], "family": "geometric", "val": score}
        },
    }
    path.write_text(json.dumps(manifest, indent=2))
    return model_dir


def uniform_image(c: int, size: tuple[int, int] = (28, 28), mode: str = "L"):
    """A Pillow image of uniform brightness bin c."""
    from PIL import Image

    g = gray_for_bin(c)
    return Image.new(mode, size, g if mode == "L" else (g,) * len(mode))


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    """Encode a Pillow image to bytes in ``fmt``."""
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# Running the real server in a subprocess
# --------------------------------------------------------------------------------------

# Packages the server must never import: torch and torchvision (training only). onnx is in
# the `serve` extra (it builds the fused cascade graph); tests/test_serving_torchless.py also
# blocks it, to show the server still serves, stage by stage, without it.
BLOCKED_PACKAGES = ("torch", "torchvision")

BLOCKER = """
import sys

class _Blocker:
    # Makes `import torch` (and the other blocked packages) fail in this process.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(name + " is blocked here: the serving package must not import it")
        return None

sys.meta_path.insert(0, _Blocker())
"""


def torch_blocking_env(
    tmp_dir: str | Path, base: dict | None = None, blocked: tuple[str, ...] = BLOCKED_PACKAGES
) -> dict:
    """An environment whose Python processes cannot import ``blocked`` (default: torch and
    torchvision), through a sitecustomize hook."""
    import os

    block_dir = Path(tmp_dir) / ("block_" + "_".join(blocked))
    block_dir.mkdir(parents=True, exist_ok=True)
    (block_dir / "sitecustomize.py").write_text(BLOCKER.format(blocked=blocked))
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(block_dir), str(ROOT)])
    return env


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(app, **config):
    """A real uvicorn serving ``app`` on 127.0.0.1 in a thread of this process (``config``: more
    uvicorn.Config arguments); yields the started uvicorn.Server, stopped on exit."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


class ServerProcess:
    """``python -m serving`` in a subprocess on 127.0.0.1; a context manager.

    Output goes to a log file (``log_path``) so a chatty server never blocks on a
    full pipe; it is included in the error if the server fails to become ready.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *args: str,
        tmp_dir: str | Path,
        block_torch: bool = True,
        env: dict | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tmp_dir) / f"server-{self.port}.log"
        self.cmd = [
            sys.executable,
            "-m",
            "serving",
            "--model-dir",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        if block_torch:
            self.env = torch_blocking_env(tmp_dir, env)
        elif env is not None:  # the caller's environment as it is (e.g. its own blocker)
            self.env = dict(env)
        else:
            self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.ready_timeout = ready_timeout
        self.proc = None

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def wait_ready(self) -> None:
        import time

        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {self.ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        self._log.close()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/serving_model.py OUT_DIR")
    print(build_model_folder(sys.argv[1]))
