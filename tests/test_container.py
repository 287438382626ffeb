"""``make container-test`` (scripts/container_test.sh): the compose stack in real containers.

Builds the CPU image with rootful podman (a debootstrap stand-in for python:3.11-slim, Debian's
prometheus as the Prometheus image), brings up server + Prometheus with docker-compose against
podman's Docker API, classifies PNG and JPEG images, runs the image's HEALTHCHECK and checks that
Prometheus scrapes the server and loaded the rules; then removes everything. Minutes, network
to the Debian archive and PyPI, root: slow-marked (CI runs `make container-test` itself).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from serving_model import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman and debootstrap need root")
@pytest.mark.skipif(
    shutil.which("apt-get") is None and shutil.which("podman") is None,
    reason="needs Debian's podman (installed with apt-get)",
)
@pytest.mark.timeout(1800)
def test_make_container_test(tmp_path):
    env = {**os.environ, "CONTAINER_TEST_DIR": str(tmp_path / "containers")}
    r = subprocess.run(
        ["bash", "scripts/container_test.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1700
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "PNG: exit" in out and "JPEG: exit" in out
    assert "HEALTHCHECK passes" in out and 'up{job="eed"} = 1' in out and "container test passed" in out
    assert not (tmp_path / "containers").exists(), "the script removes its containers, images and storage"
