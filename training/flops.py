"""FLOPs and parameters per exit, computed from the model (DESIGN §2).

FLOPs = 2 x multiply-accumulates of conv and linear layers, counted by
``torch.utils.flop_counter.FlopCounterMode`` on a batch of one. The cost of exit i is its
whole path (stem, stages 1..i, head i); a stage's cost is what its stage graph adds.

    python -m training.flops --arch resnet18 --dataset cifar100 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from training.models import MultiExitNetwork, create_model


@dataclass
class ExitCost:
    exit: int
    gflops: float  # full path: input → logits of this exit
    params: int  # parameters on that path
    stage_gflops: float  # stage graph: trunk features of stage i-1 → stage i + head i
    head_gflops: float  # head i alone (what a cascade adds beyond the trunk)
    stage_params: int


def _count(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _params(modules) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@torch.no_grad()
def exit_costs(model: MultiExitNetwork, input_shape: tuple[int, int, int]) -> list[ExitCost]:
    """Per-exit full-path and stage costs for an input of shape (C, H, W)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape)
    costs, features = [], x
    try:
        for i in range(1, model.num_exits + 1):
            full = _count(model.forward_exit, x, i)
            stage = _count(model.forward_stage, features, i)
            head = _count(model.heads[i - 1], model.forward_stage(features, i)[0])
            features = model.forward_stage(features, i)[0]
            costs.append(
                ExitCost(
                    exit=i,
                    gflops=full / 1e9,
                    params=_params(model.path_modules(i)),
                    stage_gflops=stage / 1e9,
                    head_gflops=head / 1e9,
                    stage_params=_params(model.stage_modules(i)),
                )
            )
    finally:
        model.train(was_training)
    return costs


def get_args_parser() -> argparse.ArgumentParser:
    from training.data import DATASETS

    parser = argparse.ArgumentParser(description="Per-exit FLOPs and parameters of a multi-exit network")
    parser.add_argument("--arch", required=True)
    parser.add_argument("--dataset", default="cifar100", choices=sorted(DATASETS))
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--no-exits", action="store_true", help="the plain network (baseline)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    from training.data import DATASETS

    args = get_args_parser().parse_args(argv)
    spec = DATASETS[args.dataset]
    try:
        model = create_model(args.arch, spec.num_classes, spec.channels, args.width_mult, not args.no_exits)
    except (KeyError, ValueError) as exc:  # unknown architecture, bad width
        print(f"error: {exc}", file=sys.stderr)
        return 2
    costs = exit_costs(model, (spec.channels, spec.image_size, spec.image_size))
    if args.json:
        print(
            json.dumps(
                {
                    "arch": args.arch,
                    "dataset": args.dataset,
                    "width_mult": args.width_mult,
                    "input": [spec.channels, spec.image_size, spec.image_size],
                    "exits": [asdict(c) for c in costs],
                },
                indent=2,
            )
        )
    else:
        print(f"{args.arch} on {args.dataset} input {spec.channels}x{spec.image_size}x{spec.image_size}")
        print(f"{'exit':>4} {'GFLOPs':>9} {'params':>12} {'stage GFLOPs':>13} {'head GFLOPs':>12}")
        for c in costs:
            print(f"{c.exit:>4} {c.gflops:>9.4f} {c.params:>12,} {c.stage_gflops:>13.4f} {c.head_gflops:>12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
