import json
import subprocess
import sys

import pytest
from torch import nn

from training.cascade import cumulative_gflops
from training.flops import exit_costs
from training.models import MultiExitNetwork, StageSpec, create_model


def test_counts_conv_and_linear_macs_twice():
    """A hand-checkable two-stage net: every conv and linear MAC counted as 2 FLOPs."""
    stem = nn.Identity()
    stages = [nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)]
    model = MultiExitNetwork(stem, stages, [StageSpec(4, 4), StageSpec(8, 8)], num_classes=5)
    costs = exit_costs(model, (1, 8, 8))
    conv1 = 2 * (3 * 3 * 1) * 4 * 8 * 8
    conv2 = 2 * (3 * 3 * 4) * 8 * 4 * 4
    exit_conv = 2 * (3 * 3 * 4) * 8 * 4 * 4  # exit 1's stand-in conv: 4 → 8, stride 2
    fc = 2 * 8 * 5
    assert costs[0].gflops * 1e9 == pytest.approx(conv1 + exit_conv + fc)
    assert costs[1].gflops * 1e9 == pytest.approx(conv1 + conv2 + fc)
    assert costs[1].stage_gflops * 1e9 == pytest.approx(conv2 + fc)
    assert cumulative_gflops([c.stage_gflops for c in costs])[1] * 1e9 == pytest.approx(conv1 + exit_conv + fc + conv2 + fc)
    assert costs[1].params == 1 * 4 * 9 + 4 * 8 * 9 + 8 * 5 + 5


def test_resnet18_cifar_main_output_matches_the_paper():
    model = create_model("resnet18", 100)
    costs = exit_costs(model, (3, 32, 32))
    assert costs[-1].gflops == pytest.approx(1.11, abs=0.02)  # paper: about 1.12 GFLOPs
    assert all(a.gflops < b.gflops for a, b in zip(costs, costs[1:]))
    assert costs[-1].params == pytest.approx(sum(p.numel() for n, p in model.named_parameters()
                                                 if not n.startswith(("heads.0", "heads.1", "heads.2"))))
    # Chaining the stage graphs costs the trunk once plus every head run.
    for chained, c in zip(cumulative_gflops([c.stage_gflops for c in costs]), costs):
        assert chained >= c.gflops - 1e-9


def test_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "training.flops", "--arch", "vgg19", "--dataset", "cifar100", "--json"],
        capture_output=True, text=True, check=True,
    )
    payload = json.loads(out.stdout)
    assert payload["arch"] == "vgg19" and [e["exit"] for e in payload["exits"]] == [1, 2, 3, 4]
    assert all(e["gflops"] > 0 and e["params"] > 0 for e in payload["exits"])


def test_cli_unknown_arch_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "training.flops", "--arch", "resnet19"], capture_output=True, text=True)
    assert out.returncode == 2 and "choose one of" in out.stderr and "Traceback" not in out.stderr
