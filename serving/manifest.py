"""The exported model folder's manifest: schema, loading and checksum verification.

This module is the contract between the exporter (``training.export``, which
writes ``manifest.json``) and the server (which reads it). It imports neither
torch nor onnxruntime so both sides can use it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from .cascade import cumulative_gflops

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION: Literal[1] = 1


class ManifestError(ValueError):
    """The model folder or its manifest is unusable (missing, malformed, tampered)."""


class InputSpec(BaseModel):
    """What the network expects and how to bring an arbitrary image to it."""

    # NaN and infinity are refused everywhere: a NaN mean passed, and every answer was a 500.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    channels: Literal[1, 3]
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    mean: list[float]
    std: list[float]
    # How an image of another size is brought to (height, width): "resize" scales the
    # whole image; "resize_center_crop" scales the short side to ``resize_size`` then crops.
    resize: Literal["resize", "resize_center_crop"] = "resize"
    resize_size: int | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    # Gray level (0-255) that transparent pixels are composited onto before preprocessing:
    # 255 (white) suits photos and documents; 0 suits bright-on-black data such as (Fashion-)MNIST.
    background: int = Field(default=255, ge=0, le=255)
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    normalization: str = "pixels scaled to [0, 1], then (x - mean) / std per channel"

    @model_validator(mode="after")
    def _check_stats(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class _Strict(BaseModel):
    """Unknown keys are refused: a typo or a stale field fails at load, not at use; so are NaN and
    infinity (Python's JSON reader takes them), which no figure of an export can be."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExitSpec(_Strict):
    """One exit: its full-path graph, its stage graph and what it costs."""

    exit: int = Field(ge=1)
    gflops: float = Field(gt=0, description="full path input -> logits of this exit")
    params: int = Field(ge=0, description="parameters on the full path")
    accuracy: float | None = Field(default=None, ge=0, le=1)
    path: str
    stage: str
    stage_gflops: float = Field(gt=0, description="stage graph: trunk stage i + head i")
    head_gflops: float | None = Field(default=None, ge=0)
    top5_accuracy: float | None = Field(default=None, ge=0, le=1)
    stage_params: int | None = Field(default=None, ge=0, description="parameters of the stage graph")
    cascade_gflops: float | None = Field(
        default=None, gt=0, description="a cascade stopping here: stage graphs 1..i (DESIGN §2)"
    )


class GraphIO(_Strict):
    """Names of the ONNX inputs/outputs, so the server never guesses them."""

    image_input: str = "image"
    logits_output: str = "logits"
    features_input: str = "features_in"
    features_output: str = "features_out"


class PolicyScore(_Strict):
    """A cascade policy scored on one split."""

    accuracy: float = Field(ge=0, le=1)
    mean_gflops: float = Field(ge=0)
    exit_fractions: list[float]


class CalibratedPolicy(_Strict):
    """Per-exit thresholds chosen on validation for a target (mean cost or accuracy)."""

    target: dict[str, float]
    thresholds: list[float] = Field(description="one per early exit; > 1 never stops there")
    family: str = Field(description="'shared' threshold or MSDNet's 'geometric' per-exit family")
    parameter: float | None = None
    val: PolicyScore
    test: PolicyScore | None = Field(default=None, description="the same thresholds on test: reported, not chosen")


class UncalibratedTarget(_Strict):
    name: str
    target: dict[str, float]
    reason: str


class Thresholds(_Strict):
    """The calibrated cascade policies (``serving.cascade`` holds the rule they use)."""

    rule: str
    score: str = "top softmax probability"
    calibrated_on: str | None = None
    images: int | None = None
    policies: dict[str, CalibratedPolicy] = Field(default_factory=dict)
    not_calibrated: list[UncalibratedTarget] = Field(default_factory=list)
    reason: str | None = None


class SpotCheck(_Strict):
    images: int
    stride: int
    selection: str
    accuracy: list[float]


class ExitAgreement(_Strict):
    exit: int
    both_right: float
    exit_right_main_wrong: float
    exit_wrong_main_right: float
    both_wrong: float
    predictions_differ: float


class Disagreement(_Strict):
    right_wrong: list[list[float]] = Field(description="[i][j]: share where exit i+1 is right and exit j+1 wrong")
    vs_main: list[ExitAgreement]


class Ensemble(_Strict):
    accuracy: float
    gflops: float


class CurvePoint(_Strict):
    threshold: float | None
    accuracy: float
    mean_gflops: float


class Evaluation(_Strict):
    """How the manifest's accuracies were measured (or why they were not)."""

    split: str | None = None
    reason: str | None = None
    dataset: str | None = None
    images: int | None = None
    subset: int | None = None
    backend: str | None = None
    accuracy: str | None = Field(default=None, description="what the accuracy numbers are, e.g. top-1 fraction")
    spot_check: SpotCheck | None = None
    ensemble: Ensemble | None = None
    disagreement: Disagreement | None = None
    cascade_curve: list[CurvePoint] = Field(default_factory=list)


class Parity(_Strict):
    """max |ONNX Runtime - PyTorch| on logits, allowed up to atol + rtol * max |logit|."""

    full_path: float
    stage_chain: float
    atol: float
    rtol: float | None = None  # None: an export before the relative part (absolute only)
    batch_sizes: list[int]

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        # An older export's manifest is written back (training.calibrate) without the field it never
        # had: servers before it refuse unknown keys.
        data = handler(self)
        if data.get("rtol") is None:
            data.pop("rtol", None)
        return data


class Provenance(_Strict):
    """Where the graphs came from. ``training_config`` is the run's own config, kept verbatim."""

    command: str | None = None
    note: str | None = None
    git_revision: str | None = None
    training_command: str | None = None
    training_git_revision: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    dataset: str | None = None
    epochs: int | None = None
    epochs_planned: int | None = None
    training_config: dict[str, Any] = Field(default_factory=dict)
    eval_subset: int | None = None
    exporter: str | None = None
    onnx: str | None = None
    onnxruntime: str | None = None
    opset: int | None = None
    parity: Parity | None = None
    # python -m training.calibrate: the policies and figures re-measured on these graphs since the export
    recalibrated: dict[str, Any] | None = None


# A model's name is a path segment of the server's routes (/v2/models/NAME/...) and a metric label
# value: letters, digits and . _ -, not dots alone ("." and ".." are not names in a URL). The export's
# --name (which always wrote such names), EED_MODEL_NAME and a manifest's own name all follow it.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*$"


class Manifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="letters, digits and . _ -, not dots alone")
    arch: str
    dataset: str
    classes: list[str]
    input: InputSpec
    exits: list[ExitSpec]
    files: dict[str, str] = Field(description="file name -> sha256 hex digest")
    io: GraphIO = Field(default_factory=GraphIO)
    thresholds: Thresholds | None = Field(default=None, description="calibrated cascade policies")
    provenance: Provenance = Field(default_factory=Provenance)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    width_mult: float | None = None
    method: str | None = None

    @field_validator("thresholds", mode="before")
    @classmethod
    def _no_calibration(cls, value: Any) -> Any:
        return None if value == {} else value  # older exports wrote {} for "not calibrated"

    @model_validator(mode="after")
    def _check_exits(self) -> Manifest:
        if not self.exits:
            raise ValueError("a manifest needs at least one exit")
        numbers = [e.exit for e in self.exits]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"exits must be numbered 1..k in order, got {numbers}")
        # Costs need not grow with depth: in the paper's ResNet-50 the 1024→2048 conv of
        # exit 3 costs more than stage 4 itself, so exit 3 is dearer than the main output.
        # The cost of a cascade stopping at exit i (DESIGN §2), written by the exporter;
        # filled in here for older folders so every reader finds it in one place.
        # A value the file gives must be that sum: the planner, the answers' gflops and the OpenAPI
        # minimums compute it from the stage costs, while /v1/model, the metric buckets and the
        # policy-figure check read this field (a stale one made a budget copied from /v1/model a 422).
        for e, running in zip(self.exits, cumulative_gflops([e.stage_gflops for e in self.exits]), strict=True):
            if e.cascade_gflops is None:
                e.cascade_gflops = float(running)
            elif not math.isclose(e.cascade_gflops, running, rel_tol=1e-9):
                raise ValueError(
                    f"exit {e.exit}: cascade_gflops {e.cascade_gflops:.9g} is not the sum of stage_gflops of exits "
                    f"1..{e.exit} ({running:.9g}); re-export, or remove the field to have it computed"
                )
        for e in self.exits:
            for name in (e.path, e.stage):
                if name not in self.files:
                    raise ValueError(f"exit {e.exit} names {name!r}, which has no checksum in 'files'")
        # A policy the rule cannot apply would only fail when the server builds its plans
        # (with a message naming neither the policy nor this file): refuse it here.
        for name, policy in (self.thresholds.policies if self.thresholds else {}).items():
            where = f"thresholds.policies.{name}.thresholds"
            if len(policy.thresholds) != len(self.exits) - 1:
                raise ValueError(
                    f"{where} has {len(policy.thresholds)} values; the rule needs one per early exit "
                    f"({len(self.exits) - 1})"
                )
            if not all(math.isfinite(t) and t >= 0 for t in policy.thresholds):
                raise ValueError(f"{where} must be finite and >= 0 (> 1 never stops), got {policy.thresholds}")
            for split, score in (("val", policy.val), ("test", policy.test)):
                if score is not None:
                    self._check_score(f"thresholds.policies.{name}.{split}", score)
        return self

    def _check_score(self, where: str, score: PolicyScore) -> None:
        # A policy's figures are what /v1/model and the OIP metadata report for it; a policy
        # pasted from another export keeps its thresholds applicable but its figures describe
        # that export's costs. The mean cost is the exit fractions weighted by this model's
        # cascade costs (DESIGN §2), so a mismatch shows the figures are not this model's.
        fractions = score.exit_fractions
        if len(fractions) != len(self.exits):
            raise ValueError(
                f"{where}.exit_fractions has {len(fractions)} values; this model has {len(self.exits)} exits"
            )
        if not all(math.isfinite(f) and 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-3:
            raise ValueError(f"{where}.exit_fractions must be shares in [0, 1] that sum to 1, got {fractions}")
        implied = sum(f * (e.cascade_gflops or 0.0) for f, e in zip(fractions, self.exits, strict=True))
        if not math.isclose(implied, score.mean_gflops, rel_tol=1e-3, abs_tol=1e-12):
            raise ValueError(
                f"{where}.mean_gflops is {score.mean_gflops:.6g} but its exit fractions at this model's "
                f"cascade costs give {implied:.6g}: the policy's figures are not this model's "
                f"(re-measure them with python -m training.calibrate on this folder)"
            )

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large graphs don't load into memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unreadable(path: Path, exc: OSError) -> ManifestError:
    return ManifestError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions and the disk it is on")


def load_manifest(model_dir: str | Path, verify: bool = True) -> Manifest:
    """Read and validate ``model_dir/manifest.json``; with ``verify``, check every checksum.

    Raises ManifestError saying which file is missing, malformed or altered.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {model_dir}: point --model-dir at a folder written by "
            "`python -m training.export CHECKPOINT --out DIR`"
        )
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except OSError as exc:  # unreadable (permissions, a dangling link, an I/O error)
        raise _unreadable(path, exc) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ManifestError(f"{path} is not a valid manifest: {exc}") from exc
    if verify:
        verify_files(manifest, model_dir)
    return manifest


def verify_files(manifest: Manifest, model_dir: str | Path) -> None:
    """Raise ManifestError if any file listed in the manifest is missing or altered."""
    model_dir = Path(model_dir)
    for name, expected in manifest.files.items():
        file = model_dir / name
        if not file.is_file():
            raise ManifestError(f"{file} is listed in the manifest but missing")
        try:
            actual = sha256_file(file)
        except OSError as exc:
            raise _unreadable(file, exc) from None
        if actual != expected:
            raise ManifestError(
                f"checksum mismatch for {file}: manifest says {expected[:12]}…, file has "
                f"{actual[:12]}…; the file was altered or the manifest belongs to another export"
            )


def write_manifest(manifest: Manifest, model_dir: str | Path) -> Path:
    """Write the manifest as pretty JSON (stable key order so diffs stay readable)."""
    path = Path(model_dir) / MANIFEST_NAME
    # Beside it, then renamed over it: a server starting meanwhile never reads half a manifest.
    tmp = path.with_name(f".{MANIFEST_NAME}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
