"""The generic multi-exit network: a stem, a list of stages, and one classifier head per exit.

Exits are data: a backbone builder hands over its stages with their output and base
widths, and this module attaches the paper's exit heads after every stage but the last
(DESIGN §1). Nothing here knows about ResNets or VGGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model without the CLI; saved in every checkpoint."""

    arch: str
    num_classes: int
    in_channels: int = 3
    width_mult: float = 1.0
    with_exits: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class MultiExitOutput(NamedTuple):
    """Per-exit outputs in exit order; the last entry is the main output.

    ``logits[i]`` is Z_{i+1}, ``features[i]`` is F_{i+1}: the pooled vector right before
    that classifier's linear layer. A NamedTuple so DDP, tracing and ONNX export see plain
    tensors while code reads ``out.logits`` instead of positions in an 8-tuple.
    """

    logits: tuple[torch.Tensor, ...]
    features: tuple[torch.Tensor, ...]

    @property
    def main(self) -> torch.Tensor:
        return self.logits[-1]


@dataclass(frozen=True)
class StageSpec:
    """What an exit head needs to know about a stage: its output width and its base width.

    ``base_width`` is the stage's inner width (a bottleneck's middle width; equal to the
    output width for basic blocks), used by the exit convs that stand in for the stage.
    """

    out_channels: int
    base_width: int


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 2) -> nn.Sequential:
    """3x3 conv + BN + ReLU: the building block of the paper's exit heads."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ClassifierHead(nn.Module):
    """Optional convs, global average pooling, one linear layer; returns (logits, features).

    With no convs it is the main network's own classifier; with convs it is an exit. Every
    conv has stride 2 except the last, which has ``last_stride`` (1 for VGG-19, whose last
    stage ends with a pooling of its own: DESIGN §1).
    """

    def __init__(self, in_channels: int, conv_widths: Sequence[int], num_classes: int, last_stride: int = 2):
        super().__init__()
        layers = []
        for j, width in enumerate(conv_widths):
            layers.append(conv_bn_relu(in_channels, width, last_stride if j == len(conv_widths) - 1 else 2))
            in_channels = width
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # resolution-independent (28, 32 or 224 px)
        self.fc = nn.Linear(in_channels, num_classes)
        self.feature_dim = in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.pool(self.convs(x)), 1)
        return self.fc(features), features


def exit_conv_widths(stages: Sequence[StageSpec], stage_index: int) -> list[int]:
    """Widths of the exit convs after ``stages[stage_index]`` (DESIGN §1).

    One stride-2 conv stands in for each later stage and outputs that stage's base width,
    except the last conv, which outputs the final feature width so every F_i has the same
    dimension. ResNet-50 after stage 1: [128, 256, 2048].
    """
    later = stages[stage_index + 1 :]
    if not later:
        return []
    widths = [s.base_width for s in later]
    widths[-1] = stages[-1].out_channels
    return widths


def make_exit_head(
    stages: Sequence[StageSpec], stage_index: int, num_classes: int, last_stride: int = 2
) -> ClassifierHead:
    """The one factory for every head, exits and main classifier alike."""
    widths = exit_conv_widths(stages, stage_index)
    return ClassifierHead(stages[stage_index].out_channels, widths, num_classes, last_stride)


class MultiExitNetwork(nn.Module):
    """stem → stage_1 → … → stage_k, with a classifier head after each stage.

    With ``with_exits=False`` only the main head exists (the paper's *baseline*: the plain
    network), and the model has a single exit.
    """

    config: ModelConfig  # set by the registry's builders (what rebuilds the model from a checkpoint)

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        stage_specs: Sequence[StageSpec],
        num_classes: int,
        with_exits: bool = True,
        exit_last_stride: int = 2,
    ):
        """``exit_last_stride``: stride of each exit's last conv (2 by default; VGG-19 uses 1
        so its exits end at the 4x4 of its last stage's final conv, as in the paper)."""
        super().__init__()
        if len(stages) != len(stage_specs):
            raise ValueError("one StageSpec per stage is required")
        if len(stages) < 1:
            raise ValueError("a network needs at least one stage")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_specs = tuple(stage_specs)
        self.num_classes = num_classes
        self.with_exits = with_exits
        # exit_stage[j] is the index of the stage that head j reads from.
        self.exit_stages: tuple[int, ...] = tuple(range(len(stages))) if with_exits else (len(stages) - 1,)
        # Every stage's head is built, and the baseline keeps only the last: building a head draws
        # PyTorch's default initialisation, and _init_weights then re-draws the trunk from where that
        # left the generator — so without the others the baseline's trunk began from other random
        # numbers than the multi-exit network's of the same seed, and a seed did not pair them.
        heads = [make_exit_head(self.stage_specs, s, num_classes, exit_last_stride) for s in range(len(stages))]
        self.heads = nn.ModuleList(heads[s] for s in self.exit_stages)
        self.feature_dim = self.heads[-1].feature_dim
        _init_weights(self)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        logits, features = [], []
        head_of_stage = {s: j for j, s in enumerate(self.exit_stages)}
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s in head_of_stage:
                z, f = self.heads[head_of_stage[s]](x)
                logits.append(z)
                features.append(f)
        return MultiExitOutput(tuple(logits), tuple(features))

    # --- pieces the FLOP counter and the exporter cut the model into -----------------

    def forward_exit(self, x: torch.Tensor, exit_index: int) -> torch.Tensor:
        """Logits of exit ``exit_index`` (1-based) along its full path; later stages don't run."""
        stage = self._stage_of_exit(exit_index)
        x = self.stem(x)
        for s in range(stage + 1):
            x = self.stages[s](x)
        return self.heads[exit_index - 1](x)[0]

    def forward_stage(self, x: torch.Tensor, exit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage graph of exit ``exit_index``: trunk features in → (trunk features out, logits).

        For exit 1 the input is the image and the stem runs too. Running the stage graphs
        of exits 1..i in turn gives exactly ``forward_exit(x, i)`` while computing the trunk
        once, which is what a confidence cascade needs.
        """
        stage = self._stage_of_exit(exit_index)
        first = 0 if exit_index == 1 else self._stage_of_exit(exit_index - 1) + 1
        if exit_index == 1:
            x = self.stem(x)
        for s in range(first, stage + 1):
            x = self.stages[s](x)
        return x, self.heads[exit_index - 1](x)[0]

    def path_modules(self, exit_index: int) -> list[nn.Module]:
        """Modules on the full path of an exit (for parameter counts)."""
        stage = self._stage_of_exit(exit_index)
        return [self.stem, *self.stages[: stage + 1], self.heads[exit_index - 1]]

    def stage_modules(self, exit_index: int) -> list[nn.Module]:
        """Modules of an exit's stage graph (stem included for exit 1)."""
        stage = self._stage_of_exit(exit_index)
        first = 0 if exit_index == 1 else self._stage_of_exit(exit_index - 1) + 1
        stem = [self.stem] if exit_index == 1 else []
        return [*stem, *self.stages[first : stage + 1], self.heads[exit_index - 1]]

    def _stage_of_exit(self, exit_index: int) -> int:
        if not 1 <= exit_index <= self.num_exits:
            raise IndexError(f"exit {exit_index} does not exist; this model has exits 1..{self.num_exits}")
        return self.exit_stages[exit_index - 1]


def _init_weights(model: nn.Module) -> None:
    """He init for convs, unit BN, small linear init: the usual CIFAR ResNet recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def scaled(channels: int, width_mult: float, divisor: int = 1) -> int:
    """Scale a width, keep it ≥ ``divisor`` and a multiple of it (for grouped convs)."""
    value = max(divisor, int(round(channels * width_mult / divisor)) * divisor)
    return value
