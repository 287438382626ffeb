"""Training throughput: this project's training step against a reference-shaped PyTorch loop.

The baseline has the shape of the EED authors' reference code: a ResNet-18 whose exits are
hand-written attributes (``ex1conv1`` …), a DataLoader applying torchvision's per-image
transforms (RandomCrop(pad 4), RandomHorizontalFlip, ToTensor, Normalize) to PIL images,
one loss line per exit, fp32, default memory format. Ours: ``training.engine.train_one_epoch``
with the in-memory batched augmentation and ``MultiExitLoss`` — the code `train.py` runs.
It is measured three ways: fp32 in the reference's NCHW layout (the code path alone), fp32
channels_last, and ``--amp`` (bf16 autocast on the CPU; fast where the CPU has AMX).
All train the same architecture (same layers, widths and exits) with the same EED loss,
optimizer and batch size on the same Fashion-MNIST images, one after the other in this
process, and the ratio is printed beside the figures.

    python benchmarks/train_speed.py --width-mult 0.25 --steps 30
    python benchmarks/train_speed.py --width-mult 1.0 --steps 10 --out benchmarks/results/train_speed_w1.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.checkpoint import git_revision
from training.data import build_datasets, make_loader
from training.engine import train_one_epoch
from training.losses import MultiExitLoss
from training.models import create_model
from training.models.multi_exit import scaled
from training.options import at_least
from training.train import amp_setup

# --------------------------------------------------------------------- the reference shape


class RefBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class RefResNet18(nn.Module):
    """ResNet-18 with exits written out by hand, as in the authors' reference code."""

    def __init__(self, num_classes, in_channels, w):
        super().__init__()
        c = [scaled(x, w) for x in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.in_planes = c[0]
        self.layer1 = self._make_layer(c[0], 1)
        self.layer2 = self._make_layer(c[1], 2)
        self.layer3 = self._make_layer(c[2], 2)
        self.layer4 = self._make_layer(c[3], 2)
        self.linear = nn.Linear(c[3], num_classes)
        self.ex1conv1 = nn.Conv2d(c[0], c[1], 3, 2, 1, bias=False)
        self.ex1bn1 = nn.BatchNorm2d(c[1])
        self.ex1conv2 = nn.Conv2d(c[1], c[2], 3, 2, 1, bias=False)
        self.ex1bn2 = nn.BatchNorm2d(c[2])
        self.ex1conv3 = nn.Conv2d(c[2], c[3], 3, 2, 1, bias=False)
        self.ex1bn3 = nn.BatchNorm2d(c[3])
        self.ex1linear = nn.Linear(c[3], num_classes)
        self.ex2conv1 = nn.Conv2d(c[1], c[2], 3, 2, 1, bias=False)
        self.ex2bn1 = nn.BatchNorm2d(c[2])
        self.ex2conv2 = nn.Conv2d(c[2], c[3], 3, 2, 1, bias=False)
        self.ex2bn2 = nn.BatchNorm2d(c[3])
        self.ex2linear = nn.Linear(c[3], num_classes)
        self.ex3conv1 = nn.Conv2d(c[2], c[3], 3, 2, 1, bias=False)
        self.ex3bn1 = nn.BatchNorm2d(c[3])
        self.ex3linear = nn.Linear(c[3], num_classes)

    def _make_layer(self, planes, stride):
        layers = [RefBasicBlock(self.in_planes, planes, stride), RefBasicBlock(planes, planes, 1)]
        self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out1 = self.layer1(out)
        e1 = F.relu(self.ex1bn1(self.ex1conv1(out1)))
        e1 = F.relu(self.ex1bn2(self.ex1conv2(e1)))
        e1 = F.relu(self.ex1bn3(self.ex1conv3(e1)))
        f1 = F.adaptive_avg_pool2d(e1, 1).view(e1.size(0), -1)
        out2 = self.layer2(out1)
        e2 = F.relu(self.ex2bn1(self.ex2conv1(out2)))
        e2 = F.relu(self.ex2bn2(self.ex2conv2(e2)))
        f2 = F.adaptive_avg_pool2d(e2, 1).view(e2.size(0), -1)
        out3 = self.layer3(out2)
        e3 = F.relu(self.ex3bn1(self.ex3conv1(out3)))
        f3 = F.adaptive_avg_pool2d(e3, 1).view(e3.size(0), -1)
        out4 = self.layer4(out3)
        f4 = F.adaptive_avg_pool2d(out4, 1).view(out4.size(0), -1)
        return (self.ex1linear(f1), self.ex2linear(f2), self.ex3linear(f3), self.linear(f4), f1, f2, f3, f4)


def kd_loss(student, teacher, t):
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


class _PilDataset(torch.utils.data.Dataset):
    """Images as PIL + per-image torchvision transforms, as the reference code loads CIFAR."""

    def __init__(self, split, spec):
        from torchvision import transforms

        self.images, self.labels = split.images, split.labels
        size = spec.image_size
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(size, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(spec.mean, spec.std),
            ]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        img = self.images[i].permute(1, 2, 0).squeeze(-1).numpy()
        return self.transform(Image.fromarray(img)), int(self.labels[i])


def reference_epoch(data, spec, args) -> float:
    """Images/s of the reference-shaped loop over the benchmark subset."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    net = RefResNet18(spec.num_classes, spec.channels, args.width_mult).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        _PilDataset(data.train, spec),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.ref_workers,
        drop_last=True,
    )
    criterion, t = nn.CrossEntropyLoss(), 3.0
    net.train()
    seen, start = 0, None
    for step, (inputs, targets) in enumerate(loader):
        if step == args.warmup:
            start, seen = time.perf_counter(), 0
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        optimizer.zero_grad()
        o1, o2, o3, o4, f1, f2, f3, f4 = net(inputs)
        ensemble = ((o1 + o2 + o3 + o4) / 4).detach()
        feat = ((f1 + f2 + f3 + f4) / 4).detach()
        loss = criterion(o4, targets) + criterion(o1, targets) + criterion(o2, targets) + criterion(o3, targets)
        loss += (
            kd_loss(o1, ensemble, t) + kd_loss(o2, ensemble, t) + kd_loss(o3, ensemble, t) + kd_loss(o4, ensemble, t)
        )
        loss += F.mse_loss(f1, feat) + F.mse_loss(f2, feat) + F.mse_loss(f3, feat) + F.mse_loss(f4, feat)
        loss.backward()
        optimizer.step()
        _ = o4.max(1)[1].eq(targets).sum().item()
        seen += targets.size(0)
    return seen / (time.perf_counter() - start)


def ours_epoch(data, spec, args, channels_last: bool, amp: bool) -> float:
    """Images/s of this project's training step (train_one_epoch) over the same subset."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model("resnet18", spec.num_classes, spec.channels, args.width_mult).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    criterion = MultiExitLoss("eed", "kl", 1.0, 1.0, 3.0)
    amp_dtype, scaler = amp_setup(amp, device)
    n_warm = args.warmup * args.batch_size
    for epoch, split in enumerate((data.train.take(slice(0, n_warm)), data.train.take(slice(n_warm, None)))):
        loader = make_loader(split, spec, args.batch_size, True)
        metrics = train_one_epoch(
            model, criterion, loader, optimizer, device, epoch, scaler, amp_dtype, channels_last, progress=False
        )
    return metrics["train_images_per_s"]


# (label, channels_last, amp): the same code path, then the two options train.py offers.
OURS = (("fp32, NCHW", False, False), ("fp32, channels_last", True, False), ("--amp (bf16), channels_last", True, True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--batch-size", type=at_least(1), default=128)
    p.add_argument("--steps", type=at_least(1), default=30, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    p.add_argument("--ref-workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="skip the bf16 autocast measurement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (--amp is then fp16 with loss scaling)")
    p.add_argument("--out", default=None, help="JSON results file (default benchmarks/results/train_speed_wW.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = (args.steps + args.warmup) * args.batch_size
    data = build_datasets(args.dataset, args.data_dir, subset=n)
    spec = data.spec
    print(
        f"resnet18 x{args.width_mult} EED on {spec.name}, batch {args.batch_size}, {args.steps} timed steps, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    ref = reference_epoch(data, spec, args)
    print(f"{'reference loop (fp32, NCHW, per-image transforms)':<52}: {ref:8.1f} images/s")
    ours = {}
    for label, channels_last, amp in OURS:
        if amp and not args.amp:
            continue
        if args.device.startswith("cuda"):
            label = label.replace("bf16", "fp16")  # amp_setup: fp16 with loss scaling on CUDA
        ours[label] = ours_epoch(data, spec, args, channels_last, amp)
        print(f"{'this project, ' + label:<52}: {ours[label]:8.1f} images/s   {ours[label] / ref:5.2f}x")
    print("target: >= 1.3x on CPU" if args.device == "cpu" else f"on {args.device}")
    result = {
        "arch": "resnet18",
        "width_mult": args.width_mult,
        "dataset": spec.name,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "reference_images_per_s": ref,
        "ours": {label: {"images_per_s": v, "ratio": v / ref} for label, v in ours.items()},
        "threads": torch.get_num_threads(),
        "device": args.device,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cuda": torch.cuda.is_available(),
        },
        "torch": torch.__version__,
        "git_revision": git_revision(),
        "command": " ".join(sys.argv),
    }
    out = Path(args.out or f"benchmarks/results/train_speed_w{args.width_mult:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
