"""The command line of ``training/train.py``: flags, their defaults, and the rules that tie them.

``get_args_parser`` declares the flags; ``explicit_flags`` tells typed flags from defaults;
``resolve_args`` fills the derived defaults (α per distillation kind, the scaled step schedule,
the run name) and refuses contradictory flags with a message saying what to change;
``check_resume_matches`` refuses a resume whose flags differ from the checkpoint's.
"""

from __future__ import annotations

import argparse
import math
import re
import time

from training.data import DATASETS
from training.losses import DISTILL_KINDS, METHODS, default_alpha
from training.models import list_models

PAPER_EPOCHS = 200
PAPER_MILESTONES = (75, 130, 180)

# Flags that may differ when resuming a run; everything else must match the checkpoint.
# Settings a resumed run may change. Not --output-dir or --run-name: a run continues in its own folder
# (they were accepted and ignored, and the run's checkpoint and log overwritten); copy a run to branch it.
RESUME_MUTABLE = {
    "epochs",
    "resume",
    "device",
    "workers",
    "progress",
    "threads",
    "data_dir",
    "download",
    "eval_every",
}


class UsageError(ValueError):
    """Flags that contradict each other or the checkpoint being resumed."""


DEVICE_FORMAT = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(device: str, allow_auto: bool = True) -> None:
    """UsageError unless ``device`` is one this code runs on here (torch's own errors for
    ``bogus`` or ``mps`` are tracebacks that name none of the choices)."""
    choices = "auto, cpu, cuda or cuda:N" if allow_auto else "cpu, cuda or cuda:N"
    if not DEVICE_FORMAT.fullmatch(device) or (device == "auto" and not allow_auto):
        raise UsageError(f"--device {device!r} is not a device this code runs on; use {choices}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} requested but CUDA is not available; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def at_least(minimum: int):
    """An argparse ``type``: an integer of at least ``minimum`` (argparse then names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite float of at least 0 (argparse then names the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


non_negative_float.__name__ = "number >= 0"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where it informs: not to a flag (``--no-download (default:
    True)`` read as "downloading is off by default"), not to an option whose default is None (its
    help says what happens without it), nor to a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.const is not None and isinstance(action.default, bool) or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a multi-exit CNN (EED and the methods it is compared with).",
        formatter_class=DefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", help=f"one of: {', '.join(list_models())}")
    g.add_argument("--width-mult", type=float, default=1.0, help="scale every channel width (0.25 for a CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100", choices=sorted(DATASETS), help="data set to train and test on")
    g.add_argument(
        "--data-dir",
        default=None,
        help="where the data set lives / is downloaded (default ./data; "
        "Fashion-MNIST also looks in /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument("--no-download", dest="download", action="store_false", help="never try to download data")
    g.add_argument("--val-split", type=int, default=0, help="hold out N training images for model selection")
    g.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on a seeded random N images of the training split (same --seed, same images); "
        "the test split stays whole, the rest of the training split feeds --val-split or is unused",
    )
    g.add_argument(
        "--subset",
        type=int,
        default=None,
        help="quick runs: only the first N images of every split, the test split included "
        "(use --train-size to shrink only the training set)",
    )
    g.add_argument("--workers", type=int, default=None, help="data loader workers (ImageFolder only)")
    g = p.add_argument_group("method")
    g.add_argument(
        "--method", default="eed", choices=METHODS, help="training method (eed: the paper's; the rest its baselines)"
    )
    g.add_argument("--distill", default="kl", choices=DISTILL_KINDS, help="l_z: KL (x T^2) or logit MSE")
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="weight of l_z (default 0.1 with --distill kl, 1.0 with mse: the weights the paper's "
        "authors ran; their code scales the KL term by 0.1)",
    )
    g.add_argument("--beta", type=float, default=None, help="weight of l_f (default 1.0)")
    g.add_argument("--temperature", type=float, default=3.0, help="T of the KL term")
    g.add_argument(
        "--teacher-exits",
        type=int,
        nargs="+",
        default=None,
        help="exits forming the EED ensemble teacher, e.g. 1 4 (default: all)",
    )
    g = p.add_argument_group("optimization (paper recipe by default)")
    g.add_argument(
        "--epochs", type=int, default=PAPER_EPOCHS, help="epochs to train (the whole run's, also under --resume)"
    )
    g.add_argument("--batch-size", type=int, default=128, help="global batch size, split across DDP ranks")
    g.add_argument("--lr", type=float, default=0.1, help="initial SGD learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (L2)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument(
        "--lr-schedule",
        default="multistep",
        choices=("multistep", "cosine"),
        help="learning-rate schedule over --epochs",
    )
    g.add_argument(
        "--milestones",
        type=int,
        nargs="+",
        default=None,
        help="epochs where lr is multiplied by --lr-gamma (default 75 130 180, "
        "scaled proportionally when --epochs is not 200)",
    )
    g.add_argument("--lr-gamma", type=float, default=0.1, help="factor applied to lr at each of --milestones")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and --train-size's images")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: fp16 with loss scaling on CUDA, bfloat16 autocast on the CPU "
        "(fast where the CPU has AMX/AVX512-BF16)",
    )
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: cores / processes; recorded, and kept by --resume)",
    )
    g.add_argument("--output-dir", default="runs", help="folder in which the run's folder is made")
    g.add_argument("--run-name", default=None, help="default: ARCH-DATASET-METHOD-sSEED-TIMESTAMP")
    g.add_argument("--resume", default=None, help="a run folder or checkpoint.pt to continue exactly")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and always the last)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the options the user actually typed (to tell them from defaults).

    Parses ``argv`` again with every default replaced by a sentinel (public argparse API
    only: ``set_defaults`` overrides argument defaults); what is not the sentinel was typed.
    """
    untyped = object()
    probe = get_args_parser()
    probe.set_defaults(**{dest: untyped for dest in vars(parser.parse_args([]))})
    known, _ = probe.parse_known_args(argv)
    return {dest for dest, value in vars(known).items() if value is not untyped}


def default_milestones(epochs: int) -> list[int]:
    """The paper's learning-rate milestones (75, 130, 180 of 200 epochs) scaled to ``epochs``."""
    return sorted({max(1, round(m * epochs / PAPER_EPOCHS)) for m in PAPER_MILESTONES})


def resolve_args(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """Fill derived defaults and reject contradictory flags with a message saying what to change."""
    if args.arch not in list_models():
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of: {', '.join(list_models())}")
    if args.method in ("baseline", "branchynet"):
        for flag in ("alpha", "beta", "teacher_exits"):
            if flag in explicit:
                raise UsageError(
                    f"--{flag.replace('_', '-')} has no effect with --method {args.method} "
                    "(it only weights distillation terms); drop it or use --method kd/byot/eed"
                )
    if args.method == "kd" and "beta" in explicit:
        raise UsageError("--beta weights the feature term, which --method kd does not have; use --method byot or eed")
    if args.teacher_exits and args.method != "eed":
        raise UsageError("--teacher-exits selects the EED ensemble teacher; it needs --method eed")
    if "distill" in explicit and args.method in ("baseline", "branchynet"):
        raise UsageError(f"--distill has no effect with --method {args.method}")
    if "temperature" in explicit and args.method in ("baseline", "branchynet"):
        raise UsageError(f"--temperature has no effect with --method {args.method} (it has no distillation term)")
    if "temperature" in explicit and args.distill != "kl":
        raise UsageError(f"--temperature is the KL term's; --distill {args.distill} does not use it: drop it")
    if args.alpha is None:
        args.alpha = default_alpha(args.distill)
    args.beta = 1.0 if args.beta is None else args.beta
    if args.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.val_split < 0:
        raise UsageError("--val-split must be 0 (no validation split) or a positive number of images")
    # NaN passes any "<= 0" test and surfaces mid-epoch as a NaN loss blamed on the learning rate.
    for flag, value in (("temperature", args.temperature), ("width_mult", args.width_mult), ("lr", args.lr)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive finite number, got {value}")
    for flag, value in (("alpha", args.alpha), ("beta", args.beta), ("weight_decay", args.weight_decay)):
        if not (value >= 0 and math.isfinite(value)):
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not 0 <= args.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (args.lr_gamma > 0 and math.isfinite(args.lr_gamma)):
        raise UsageError(f"--lr-gamma must be a positive finite factor, got {args.lr_gamma}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be 0 (load in the training process) or more, got {args.workers}")
    if args.teacher_exits is not None and len(set(args.teacher_exits)) != len(args.teacher_exits):
        raise UsageError(f"--teacher-exits {args.teacher_exits} names an exit twice; name each once")
    if args.seed < 0:  # numpy's seed sequences (the augmentation's) take none below 0
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    if args.eval_every < 1:
        raise UsageError("--eval-every must be at least 1")
    if args.train_size is not None and args.train_size < 2:
        raise UsageError("--train-size must be at least 2 images")
    if args.subset is not None and args.subset < 2:
        raise UsageError("--subset must be at least 2 images")
    if args.milestones is None:
        args.milestones = default_milestones(args.epochs)
    elif min(args.milestones) < 1:
        raise UsageError(f"--milestones are epochs (1 or more), got {args.milestones}")
    if "milestones" in explicit and args.lr_schedule == "cosine":
        raise UsageError("--milestones belongs to --lr-schedule multistep, not cosine")
    if args.run_name is None:
        args.run_name = f"{args.arch}-{args.dataset}-{args.method}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def check_resume_matches(saved: dict, args: argparse.Namespace, explicit: set[str]) -> None:
    """UsageError naming every typed flag that differs from the run being resumed."""
    mismatched = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r} (checkpoint: {saved[k]!r})"
        for k in sorted(explicit - RESUME_MUTABLE)
        if k in saved and saved[k] != getattr(args, k)
    ]
    if mismatched:
        raise UsageError(
            "cannot resume with settings that differ from the checkpoint's: "
            + "; ".join(mismatched)
            + ". Drop those flags to continue the run as it was, or start a new run without --resume."
        )
