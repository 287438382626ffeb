import pytest
import torch

from training.models import MultiExitOutput, UnknownModelError, create_model, list_models


def _input(arch):
    size = 64 if arch.startswith("imagenet") else 28
    return torch.randn(3, 1, size, size)


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_forward_backward(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, in_channels=1, width_mult=0.125)
    out = model(_input(arch))
    assert isinstance(out, MultiExitOutput)
    expected_exits = 3 if arch in ("resnext29", "wrn28_10", "pyramidnet110") else 4
    assert model.num_exits == expected_exits == len(out.logits) == len(out.features)
    for z, f in zip(out.logits, out.features):
        assert z.shape == (3, 7)
        assert f.shape == (3, model.feature_dim)  # every F_i has the main output's dimension
        assert torch.isfinite(z).all() and torch.isfinite(f).all()
    sum(z.square().mean() for z in out.logits).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _head_widths(model):
    return [[block[0].out_channels for block in head.convs] for head in model.heads]


def test_exit_widths_follow_the_paper():
    # DESIGN §1: ResNet-18 64→128→256→512, 128→256→512, 256→512.
    r18 = create_model("resnet18", 100)
    assert _head_widths(r18) == [[128, 256, 512], [256, 512], [512], []]
    assert [h.convs[0][0].in_channels for h in r18.heads[:3]] == [64, 128, 256]
    # ResNet-50: 256→128→256→2048, 512→256→2048, 1024→2048.
    r50 = create_model("resnet50", 100)
    assert _head_widths(r50) == [[128, 256, 2048], [256, 2048], [2048], []]
    assert [h.convs[0][0].in_channels for h in r50.heads[:3]] == [256, 512, 1024]
    for conv in (c for h in r50.heads for c in h.convs):
        assert conv[0].stride == (2, 2) and conv[0].kernel_size == (3, 3)


def test_stage_chain_equals_full_paths_and_forward():
    torch.manual_seed(0)
    model = create_model("resnet34", 10, in_channels=1, width_mult=0.125).eval()
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    features = x
    for i in range(1, model.num_exits + 1):
        features, logits = model.forward_stage(features, i)
        torch.testing.assert_close(logits, out.logits[i - 1])
        torch.testing.assert_close(model.forward_exit(x, i), out.logits[i - 1])


def test_baseline_has_only_the_main_output():
    model = create_model("resnet18", 10, in_channels=1, width_mult=0.125, with_exits=False)
    assert model.num_exits == 1
    out = model(torch.randn(2, 1, 28, 28))
    assert len(out.logits) == 1 and out.main.shape == (2, 10)


@pytest.mark.parametrize("arch", list_models())
def test_a_seed_gives_the_baseline_the_backbone_weights_of_the_network_with_exits(arch):
    # The paired comparison (benchmarks/reproduce.py) pairs methods by seed: the baseline's backbone
    # began from other random numbers (its missing heads drew none), so its pairs shared only the data.
    models = []
    for with_exits in (True, False):
        torch.manual_seed(3)
        models.append(create_model(arch, 7, in_channels=1, width_mult=0.125, with_exits=with_exits).state_dict())
    exits, baseline = models
    trunk = [k for k in baseline if not k.startswith("heads.")]
    assert trunk and all(torch.equal(baseline[k], exits[k]) for k in trunk)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(UnknownModelError, match="choose one of: .*resnet18"):
        create_model("resnet19", 10)
    with pytest.raises(IndexError, match="exits 1..4"):
        create_model("resnet18", 10, width_mult=0.125).forward_exit(torch.randn(1, 3, 32, 32), 5)
