"""Checkpoints that rebuild their model without the CLI.

A checkpoint holds the weights plus everything needed to rebuild and use them: the model
config (architecture, classes, width), the data set's input spec and class names, the
resolved training config, and the optimizer/scheduler state for an exact resume.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from training.models import MultiExitNetwork, UnknownModelError, create_model_from_config

CHECKPOINT_FORMAT = "eed-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a checkpoint of this project, or does not fit what it is used for."""


REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_relative(value):
    """A path for a run's records: inside this repository, relative to it (records must not carry
    the absolute paths of the machine that ran them); outside, absolute (a path relative to the
    folder the run was started from means nothing to a later reader); anything else unchanged."""
    if not isinstance(value, str) or not value:
        return value
    resolved = Path(value).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return value if os.path.isabs(value) else str(resolved)


def from_record(value):
    """A path read from a run's records (:func:`repo_relative`'s): a relative one is the
    repository's, whatever folder the reader runs in."""
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    return str(REPO_ROOT / value)


def git_revision(cwd: str | Path | None = None) -> str | None:
    """The current commit (with '-dirty' if the tree has changes), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (its ``checkpoint.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a checkpoint file or a run folder from training/train.py")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and check a checkpoint written by ``save_checkpoint``."""
    path = resolve_checkpoint_path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by training/train.py")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload['version']}; this code reads ≤ {CHECKPOINT_VERSION}"
        )
    return payload


def load_model(path: str | Path, map_location="cpu") -> tuple[MultiExitNetwork, dict]:
    """Rebuild the model stored in a checkpoint, weights loaded, in eval mode."""
    payload = load_checkpoint(path, map_location)
    config = payload.get("model_config")
    if not isinstance(config, dict) or "model" not in payload:
        raise CheckpointError(f"{path} holds no model_config and weights; pass a checkpoint of a training run")
    try:
        model = create_model_from_config(config)
    except UnknownModelError as exc:  # a checkpoint of another version of this code, or edited
        raise CheckpointError(f"{path} was trained with an architecture this code does not have: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}'s model_config {config} does not describe a model this code builds: {exc}"
        ) from None
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit {payload['model_config']}: {exc}") from exc
    return model.eval(), payload
