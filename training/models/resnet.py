"""ResNets (CIFAR-style and ImageNet-style) and the paper's ResNeXt-29, as multi-exit networks.

The residual blocks are torchvision's own (``BasicBlock``, ``Bottleneck``); only the stem
and the stage widths differ between the CIFAR and ImageNet variants.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .multi_exit import MultiExitNetwork, StageSpec, scaled
from .registry import register_model

BlockType = type[BasicBlock] | type[Bottleneck]


def _make_stage(block: BlockType, in_planes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """One ResNet stage of ``blocks`` residual blocks; returns it and its output width."""
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
        )
    layers = [block(in_planes, planes, stride, downsample)]
    layers += [block(out_planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers), out_planes


def build_resnet(
    block: BlockType,
    layers: Sequence[int],
    num_classes: int,
    in_channels: int,
    width_mult: float,
    with_exits: bool,
    imagenet_stem: bool = False,
) -> MultiExitNetwork:
    """A 4-stage ResNet: CIFAR stem (3x3 conv) or ImageNet stem (7x7/2 conv + max pool)."""
    widths = [scaled(w, width_mult) for w in (64, 128, 256, 512)]
    stem_width = widths[0]
    if imagenet_stem:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
    stages, specs, in_planes = [], [], stem_width
    for i, (planes, blocks) in enumerate(zip(widths, layers)):
        stage, in_planes = _make_stage(block, in_planes, planes, blocks, stride=1 if i == 0 else 2)
        stages.append(stage)
        # A bottleneck's base width is its inner width; a basic block's equals its output.
        specs.append(StageSpec(out_channels=in_planes, base_width=planes))
    return MultiExitNetwork(stem, stages, specs, num_classes, with_exits)


def _register_resnet(name: str, block: BlockType, layers: Sequence[int], imagenet: bool) -> None:
    style = "ImageNet-style (224 px, torchvision layout)" if imagenet else "CIFAR-style (3x3 stem)"

    def builder(num_classes, in_channels=3, width_mult=1.0, with_exits=True):
        return build_resnet(block, layers, num_classes, in_channels, width_mult, with_exits, imagenet)

    builder.__doc__ = f"{style} {name} with an exit after each of its first 3 stages."
    register_model(name)(builder)


for _depth, _block, _layers in (
    (18, BasicBlock, (2, 2, 2, 2)),
    (34, BasicBlock, (3, 4, 6, 3)),
    (50, Bottleneck, (3, 4, 6, 3)),
    (101, Bottleneck, (3, 4, 23, 3)),
    (152, Bottleneck, (3, 8, 36, 3)),
):
    _register_resnet(f"resnet{_depth}", _block, _layers, imagenet=False)
for _depth, _block, _layers in ((18, BasicBlock, (2, 2, 2, 2)), (50, Bottleneck, (3, 4, 6, 3))):
    _register_resnet(f"imagenet_resnet{_depth}", _block, _layers, imagenet=True)


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (Xie et al. 2017, CIFAR variant): 1x1 → grouped 3x3 → 1x1, expansion 2."""

    expansion = 2

    def __init__(self, in_planes: int, group_width: int, cardinality: int, stride: int):
        super().__init__()
        out_planes = group_width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, group_width, 1, bias=False),
            nn.BatchNorm2d(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality, bias=False),
            nn.BatchNorm2d(group_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(group_width, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


@register_model("resnext29")
def resnext29(num_classes, in_channels=3, width_mult=1.0, with_exits=True, cardinality=4, bottleneck_width=64):
    """CIFAR ResNeXt-29 (4x64d): 3 stages of 3 grouped bottlenecks, two exits."""
    stem_width = scaled(64, width_mult)
    stem = nn.Sequential(
        nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem_width),
        nn.ReLU(inplace=True),
    )
    stages, specs, in_planes = [], [], stem_width
    for i in range(3):
        # Grouped convs need the inner width to be a multiple of the cardinality.
        group_width = scaled(cardinality * bottleneck_width * 2**i, width_mult, divisor=cardinality)
        blocks = [ResNeXtBlock(in_planes, group_width, cardinality, stride=1 if i == 0 else 2)]
        in_planes = group_width * ResNeXtBlock.expansion
        blocks += [ResNeXtBlock(in_planes, group_width, cardinality, 1) for _ in range(2)]
        stages.append(nn.Sequential(*blocks))
        specs.append(StageSpec(out_channels=in_planes, base_width=group_width))
    return MultiExitNetwork(stem, stages, specs, num_classes, with_exits)
