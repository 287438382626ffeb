"""Which build and which model a replica serves: the labels of ``eed_build_info``.

With several replicas behind one Service, a dashboard or an alert has to tell which code
and which weights each one runs (a half-finished rollout, a replica left on an old model).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = "eed-anytime"
# Images have no .git: the Dockerfiles take the revision as a build argument into this variable.
REVISION_ENV = "GIT_REVISION"
UNKNOWN = "unknown"


def package_version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def git_revision() -> str:
    """The code's git revision: $GIT_REVISION, else the checkout this package runs from, else 'unknown'."""
    revision = os.environ.get(REVISION_ENV, "").strip()
    if revision:
        return revision
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else UNKNOWN


def model_checksum(files: dict[str, str]) -> str:
    """One sha256 over the manifest's per-file checksums: equal exactly when the weights are equal."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
