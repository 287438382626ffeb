"""A real Prometheus (Debian package ``prometheus``) scrapes the server and answers queries."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest
from serving_model import (
    NUM_EXITS,
    ServerProcess,
    build_model_folder,
    encode,
    free_port,
    stop_process,
    uniform_image,
)

PROMETHEUS = shutil.which("prometheus") or shutil.which(
    "prometheus", path=os.pathsep.join(["/usr/bin", "/usr/local/bin"])
)

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed (Debian: prometheus)")


def query(url: str, promql: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    return r.json()["data"]["result"]


def wait_for(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


def test_prometheus_scrapes_per_exit_series(tmp_path):
    model = build_model_folder(tmp_path / "model")
    with ServerProcess(model, "--intra-op-threads", "1", tmp_dir=tmp_path) as server:
        target = server.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: eed\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        prom_url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "prometheus.log"
        with open(log_path, "wb") as log:
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                show_log = log_path.read_text
                wait_for(
                    lambda: httpx.get(prom_url + "/-/ready", timeout=2).status_code == 200,
                    30,
                    "prometheus to start",
                    show_log,
                )
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    for c in range(10):
                        r = client.post(
                            "/classify",
                            content=encode(uniform_image(c), "PNG"),
                            headers={"Content-Type": "image/png"},
                            params={"confidence": 0.9},
                        )
                        assert r.status_code == 200

                costs = wait_for(
                    lambda: len(query(prom_url, "eed_exit_gflops")) == NUM_EXITS and query(prom_url, "eed_exit_gflops"),
                    30,
                    "per-exit cost series",
                    show_log,
                )
                assert sorted(s["metric"]["exit"] for s in costs) == [str(i) for i in range(1, NUM_EXITS + 1)]
                assert all(s["metric"]["job"] == "eed" for s in costs)

                # The cascade answered from every exit (bins 7-9 → 1, 4-6 → 2, 0-3 → 3).
                answered = wait_for(
                    lambda: (
                        (res := query(prom_url, 'sum by (exit) (eed_requests_total{status="200"})'))
                        and len(res) == NUM_EXITS
                        and res
                    ),
                    30,
                    "per-exit request counts",
                    show_log,
                )
                counts = {s["metric"]["exit"]: float(s["value"][1]) for s in answered}
                assert counts == {"1": 3.0, "2": 3.0, "3": 4.0}

                accuracy = query(prom_url, "eed_exit_accuracy")
                assert len(accuracy) == NUM_EXITS
                up = query(prom_url, 'up{job="eed"}')
                assert up and up[0]["value"][1] == "1"
            finally:
                stop_process(prom)
