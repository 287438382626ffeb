"""VGG-19 (BN), Wide ResNet-28-10 and PyramidNet-110 (alpha 270), CIFAR-style, as multi-exit networks."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .multi_exit import MultiExitNetwork, StageSpec, scaled
from .registry import register_model

# VGG-19 cut at its pooling layers into 4 stages; the last holds the two 512-wide blocks
# (32 → 16 → 8 → 4 → 1 px), so the exits sit at 16, 8 and 4 px like a ResNet's. The last
# stage's final conv block works at 2 px, but the paper's exits end at 4x4 (its cost table):
# every exit conv has stride 2 except the last (stride 1), DESIGN §1.
_VGG19_STAGES: tuple[tuple[int | str, ...], ...] = (
    (64, 64, "M"),
    (128, 128, "M"),
    (256,) * 4 + ("M",),
    (512,) * 4 + ("M",) + (512,) * 4 + ("M",),
)


@register_model("vgg19")
def vgg19(num_classes, in_channels=3, width_mult=1.0, with_exits=True):
    """CIFAR VGG-19 with batch norm, 4 stages split at the pooling layers, three exits."""
    stages, specs = [], []
    c_in = in_channels
    for cfg in _VGG19_STAGES:
        layers: list[nn.Module] = []
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # ceil: 7 px → 4 → 2 → 1 for 28 px input
            else:
                width = scaled(int(item), width_mult)
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
                c_in = width
        stages.append(nn.Sequential(*layers))
        specs.append(StageSpec(out_channels=c_in, base_width=c_in))
    return MultiExitNetwork(nn.Identity(), stages, specs, num_classes, with_exits, exit_last_stride=1)


class PreActBlock(nn.Module):
    """Wide-ResNet pre-activation basic block: BN-ReLU-conv-BN-ReLU-conv + shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


@register_model("wrn28_10")
def wrn28_10(num_classes, in_channels=3, width_mult=1.0, with_exits=True, depth=28, widen=10):
    """Wide ResNet-28-10: 3 stages of 4 pre-activation blocks (160/320/640 wide), two exits."""
    n = (depth - 4) // 6
    widths = [scaled(16 * widen * 2**i, width_mult) for i in range(3)]
    stem_width = scaled(16, width_mult)
    stem = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
    stages, specs, in_planes = [], [], stem_width
    for i, width in enumerate(widths):
        blocks: list[nn.Module] = [PreActBlock(in_planes, width, 1 if i == 0 else 2)]
        blocks += [PreActBlock(width, width, 1) for _ in range(n - 1)]
        if i == len(widths) - 1:  # pre-activation nets end with BN-ReLU before pooling
            blocks += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*blocks))
        specs.append(StageSpec(width, width))
        in_planes = width
    return MultiExitNetwork(stem, stages, specs, num_classes, with_exits)


class PyramidBlock(nn.Module):
    """PyramidNet basic block: BN-conv-BN-ReLU-conv-BN, zero-padded identity shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes),
            nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, padding=1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.stride = stride
        self.extra_channels = planes - in_planes

    def forward(self, x):
        out = self.body(x)
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        if self.extra_channels > 0:  # parameter-free shortcut: pad the new channels with zeros
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return out + shortcut


@register_model("pyramidnet110")
def pyramidnet110(num_classes, in_channels=3, width_mult=1.0, with_exits=True, depth=110, alpha=270):
    """PyramidNet-110 (alpha 270): widths grow linearly 16 → 286 over 3 stages, two exits."""
    n = (depth - 2) // 6
    start = scaled(16, width_mult)
    step = alpha * width_mult / (3 * n)
    stem = nn.Sequential(nn.Conv2d(in_channels, start, 3, padding=1, bias=False), nn.BatchNorm2d(start))
    stages, specs = [], []
    in_planes, width = start, float(start)
    for i in range(3):
        blocks: list[nn.Module] = []
        for b in range(n):
            width += step
            planes = int(round(width))
            blocks.append(PyramidBlock(in_planes, planes, 2 if (i > 0 and b == 0) else 1))
            in_planes = planes
        if i == 2:
            blocks += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)]
        stages.append(nn.Sequential(*blocks))
        specs.append(StageSpec(in_planes, in_planes))
    return MultiExitNetwork(stem, stages, specs, num_classes, with_exits)


__all__ = ["vgg19", "wrn28_10", "pyramidnet110"]
