import json
import subprocess
import sys

import pytest
import torch
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
    assert cumulative_gflops([c.stage_gflops for c in costs])[1] * 1e9 == pytest.approx(
        conv1 + exit_conv + fc + conv2 + fc
    )
    assert costs[1].params == 1 * 4 * 9 + 4 * 8 * 9 + 8 * 5 + 5


def test_resnet18_cifar_main_output_matches_the_paper():
    model = create_model("resnet18", 100)
    costs = exit_costs(model, (3, 32, 32))
    assert costs[-1].gflops == pytest.approx(1.11, abs=0.02)  # paper: about 1.12 GFLOPs
    assert all(a.gflops < b.gflops for a, b in zip(costs, costs[1:]))
    assert costs[-1].params == pytest.approx(
        sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.0", "heads.1", "heads.2")))
    )
    # Chaining the stage graphs costs the trunk once plus every head run.
    for chained, c in zip(cumulative_gflops([c.stage_gflops for c in costs]), costs):
        assert chained >= c.gflops - 1e-9


def test_cli_json():
    out = subprocess.run(
        [sys.executable, "-m", "training.flops", "--arch", "vgg19", "--dataset", "cifar100", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    payload = json.loads(out.stdout)
    assert payload["arch"] == "vgg19" and [e["exit"] for e in payload["exits"]] == [1, 2, 3, 4]
    assert all(e["gflops"] > 0 and e["params"] > 0 for e in payload["exits"])


def test_cli_unknown_arch_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "training.flops", "--arch", "resnet19"], capture_output=True, text=True)
    assert out.returncode == 2 and "choose one of" in out.stderr and "Traceback" not in out.stderr


def test_vgg19_exits_end_at_4x4_and_cost_what_the_paper_design_gives():
    """DESIGN §1: VGG-19's exits (at 16, 8, 4 px on a 32-px input) use stride-2 convs except
    the last (stride 1), so every exit's last map is 4x4. Costs are computed here by hand from
    that design (2 x MACs of convs and the linear layer) and compared with the model's."""
    model = create_model("vgg19", 100)
    last_maps = []
    for head in model.heads[:-1]:
        head.convs[-1].register_forward_hook(lambda m, i, o: last_maps.append(tuple(o.shape[-2:])))
    model.eval()(torch.zeros(1, 3, 32, 32))
    assert last_maps == [(4, 4)] * 3

    def conv(c_in, c_out, px):
        return 2 * 9 * c_in * c_out * px * px

    trunk = [  # cumulative cost at the end of each stage (stages end at the pooling layers)
        conv(3, 64, 32) + conv(64, 64, 32),
        conv(64, 128, 16) + conv(128, 128, 16),
        conv(128, 256, 8) + 3 * conv(256, 256, 8),
        conv(256, 512, 4) + 3 * conv(512, 512, 4) + 4 * conv(512, 512, 2),
    ]
    trunk = [sum(trunk[: i + 1]) for i in range(4)]
    fc = 2 * 512 * 100
    heads = [  # 64→128→256→512, 128→256→512, 256→512; outputs at 8, 4, 4 px / 4, 4 px / 4 px
        conv(64, 128, 8) + conv(128, 256, 4) + conv(256, 512, 4),
        conv(128, 256, 4) + conv(256, 512, 4),
        conv(256, 512, 4),
        0,
    ]
    costs = exit_costs(model, (3, 32, 32))
    # 0.136, 0.240, 0.494 and 0.796 GFLOPs (exits ending at 2x2 cost 0.107, 0.211, 0.466).
    assert [c.gflops for c in costs] == pytest.approx([(t + h + fc) / 1e9 for t, h in zip(trunk, heads)])
