"""Export an untrained multi-exit model (random weights) — for speed benchmarks only.

Serving speed does not depend on what the weights learned, so a full-width CIFAR ResNet-18
can be benchmarked without days of training:

    python benchmarks/untrained_export.py --arch resnet18 --dataset cifar100 --out runs/bench/resnet18-cifar100
    python benchmarks/serve_bench.py runs/bench/resnet18-cifar100 exported/fmnist-resnet18-eed

The checkpoint is written in train.py's format and exported with ``training.export``
(``--skip-eval``: no accuracy, no thresholds), so the graphs are exactly what a trained
model of that architecture would ship.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from training.checkpoint import save_checkpoint
from training.data import DATASETS
from training.export import export_checkpoint
from training.flops import exit_costs
from training.models import create_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--dataset", default="cifar100", choices=sorted(DATASETS))
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    spec = DATASETS[args.dataset]
    model = create_model(args.arch, spec.num_classes, spec.channels, args.width_mult).eval()
    shape = (spec.channels, spec.image_size, spec.image_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = out.parent / f"{out.name}-untrained.pt"
    save_checkpoint(
        {
            "model_config": model.config.to_dict(),
            "config": {"untrained": True, **vars(args)},
            "dataset": {
                "name": spec.name,
                "classes": [f"class {i}" for i in range(spec.num_classes)],
                "channels": spec.channels,
                "image_size": spec.image_size,
                "mean": list(spec.mean),
                "std": list(spec.std),
            },
            "exit_costs": [asdict(c) for c in exit_costs(model, shape)],
            "epoch": 0,
            "model": model.state_dict(),
        },
        ckpt,
    )
    export_checkpoint(ckpt, out, name=out.name, skip_eval=True, force=True, argv=sys.argv[1:])
    print(f"wrote {out} (untrained {args.arch} x{args.width_mult} for {spec.name} input)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
