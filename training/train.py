"""Train a multi-exit network with EED or any of the methods the paper compares.

    python training/train.py --arch resnet18                       # the paper: EED, CIFAR-100, 200 epochs
    python training/train.py --arch resnet18 --dataset fashion-mnist --width-mult 0.25 --epochs 15
    torchrun --nproc_per_node=2 training/train.py --arch resnet18 ...   # DDP (gloo on CPU, nccl on GPU)

Each run writes a folder (``--output-dir/--run-name``) with the resolved ``config.json``,
``log.jsonl`` (one line per epoch), ``checkpoint.pt`` (every epoch; rebuilds the model
without the CLI; ``--resume`` continues it exactly), ``best.pt`` when a validation split
selects a model, and ``final.json`` with the test-split results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from training.checkpoint import (
    CheckpointError,
    from_record,
    git_revision,
    load_checkpoint,
    repo_relative,
    resolve_checkpoint_path,
    save_checkpoint,
)
from training.data import DataBundle, DatasetNotFoundError, build_datasets, default_workers, make_loader
from training.engine import evaluate, share_rank0_buffers, train_one_epoch
from training.flops import exit_costs
from training.losses import MultiExitLoss
from training.models import UnknownModelError, create_model
from training.models.multi_exit import MultiExitNetwork
from training.options import (
    RESUME_MUTABLE,
    UsageError,
    check_device,
    check_resume_matches,
    default_milestones,
    explicit_flags,
    get_args_parser,
    resolve_args,
)

# ----------------------------------------------------------------------------- setup


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(device_arg)
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size > 1:
        backend = "nccl" if device_arg.startswith("cuda") else "gloo"
        if device_arg.startswith("cuda"):
            device_arg = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, world_size, torch.device(device_arg)


def amp_setup(enabled: bool, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and grad scaler: fp16 + scaling on CUDA; bf16 (no scaling needed) on the CPU."""
    if not enabled:
        return None, None
    if device.type == "cuda":
        return torch.float16, torch.amp.GradScaler("cuda")
    return torch.bfloat16, None


def build_scheduler(optimizer, args):
    """Per-epoch schedule: the paper's step decay, or cosine."""
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.lr_gamma)


PATH_KEYS = ("data_dir", "output_dir", "run_dir", "resume")


def format_epoch_line(epoch: int, epochs: int, lr: float, metrics: dict, split: str | None) -> str:
    """One human-readable line per epoch: loss components, per-exit and ensemble accuracy."""
    parts = [f"epoch {epoch:>3}/{epochs}", f"lr {lr:.4g}", f"loss {metrics['train_loss']:.4f}"]
    parts.append(
        "(ce {:.3f} kd {:.3f} feat {:.3f})".format(
            metrics["train_ce"], metrics["train_logit_distill"], metrics["train_feature_distill"]
        )
    )
    if split:
        accs = [f"{k.split('_')[-1]} {100 * v:.2f}" for k, v in metrics.items() if k.startswith(f"{split}_acc_")]
        parts.append(f"| {split} " + " ".join(accs))
    parts.append(f"| {metrics['train_images_per_s']:.0f} img/s {metrics['train_seconds']:.1f}s")
    return " ".join(parts)


# ----------------------------------------------------------------------------- main


@dataclass
class Run:
    """Everything one training run holds between setup, the epoch loop and the final report."""

    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    data: DataBundle
    train_loader: Iterable
    eval_loader: Iterable
    eval_split: str
    model: MultiExitNetwork
    costs: list
    criterion: MultiExitLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    run_dir: Path
    config: dict
    dataset_info: dict
    revision: str | None
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"epoch": None, "val_acc_main": -1.0})
    command: list[str] = field(default_factory=lambda: list(sys.argv))  # as typed, for config.json

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def main(args: argparse.Namespace, explicit: set[str] | None = None, command: list[str] | None = None) -> dict:
    """Train as ``args`` says; returns the final test metrics (rank 0) or {} (other ranks).
    ``command``: the command line to record (default ``sys.argv``)."""
    run = setup(args, explicit if explicit is not None else set())
    if command is not None:
        run.command = command
    if run.is_main:
        try:
            write_run_records(run)
        except OSError as exc:
            raise UsageError(
                f"cannot write the run folder {run.run_dir} ({exc.strerror or exc}); choose a writable --output-dir"
            ) from None
    train_epochs(run)
    return finalize(run)


def refuse_rewinding(resumed: Path, epoch: int) -> None:
    """A run continues in the folder of the checkpoint it resumes, writing its ``checkpoint.pt`` and
    log there: resumed from an earlier checkpoint of that folder (``best.pt``), it would overwrite the
    later ``checkpoint.pt`` and drop the log's later epochs. Refused, with how to branch instead."""
    latest = resumed.parent / "checkpoint.pt"
    if resumed.resolve() == latest.resolve() or not latest.is_file():
        return
    later = load_checkpoint(latest).get("epoch", 0)
    if later > epoch:
        config = resumed.parent / "config.json"  # keeps the command that started the run (see write_run_records)
        copy_config = f" && cp {config} NEW/" if config.is_file() else ""
        raise UsageError(
            f"{resumed} is epoch {epoch}, but {latest} in the same run folder is epoch {later}: resuming would "
            f"train from epoch {epoch} in that folder, overwrite {latest.name} and drop the later epochs of its "
            f"log. To continue the run, --resume {resumed.parent}; to branch from {resumed.name}, give it a "
            f"folder of its own as its checkpoint.pt: mkdir NEW && cp {resumed} NEW/checkpoint.pt{copy_config}, "
            "then --resume NEW"
        )


def setup(args: argparse.Namespace, explicit: set[str]) -> Run:
    """Resolve the flags (or the resumed run's), then build data, model, loss, optimizer and state."""
    resume_payload = None
    if args.resume:
        resume_payload = load_checkpoint(args.resume)
        refuse_rewinding(resolve_checkpoint_path(args.resume), resume_payload["epoch"])
        saved = resume_payload["config"]
        check_resume_matches(saved, args, explicit)
        for key, value in saved.items():  # the run continues with its own settings
            if key != "resume" and (key not in RESUME_MUTABLE or key not in explicit):
                setattr(args, key, from_record(value) if key in PATH_KEYS else value)
        args.run_dir = str(Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent)
    args = resolve_args(args, explicit)

    rank, world_size, device = init_distributed(args.device)
    if world_size > 1 and "run_name" not in explicit:
        # The default name holds the time each process parsed its flags: processes straddling a second
        # would each write (and rank 1 read best.pt from) a folder of its own. Rank 0's names the run.
        shared = [args.run_name]
        dist.broadcast_object_list(shared, src=0)
        args.run_name = shared[0]
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world_size} DDP processes")
    trained_with = resume_payload["config"].get("threads") if resume_payload is not None else None
    if "threads" in explicit and trained_with not in (None, args.threads):
        print(
            f"warning: this run trained with --threads {trained_with}; with --threads "
            f"{args.threads} its results will differ from an uninterrupted run's (kernels split the sums "
            "differently: BatchNorm statistics drift by percent over an epoch)",
            file=sys.stderr,
        )
    # The count resolved is what the run records: results depend on it, and a resume (on this or
    # another machine) continues with it unless --threads is given.
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(args.threads)
    # The same for an ImageFolder run's loader workers: each worker draws its own crops, so the
    # augmentations depend on how many there are (the default follows the machine's CPUs).
    saved_workers = resume_payload["config"].get("workers") if resume_payload is not None else None
    if args.dataset == "imagefolder" and "workers" in explicit and saved_workers not in (None, args.workers):
        print(
            f"warning: this run trained with --workers {saved_workers}; with --workers {args.workers} its "
            "augmentations, and so its results, will differ from an uninterrupted run's",
            file=sys.stderr,
        )
    args.workers = default_workers() if args.workers is None else args.workers
    torch.manual_seed(args.seed)

    data = build_datasets(
        args.dataset, args.data_dir, args.val_split, args.subset, args.seed, args.download, args.train_size
    )
    spec = data.spec
    per_rank_batch = args.batch_size // world_size
    train_loader = make_loader(data.train, spec, per_rank_batch, True, args.seed, rank, world_size, args.workers)
    eval_split = "val" if data.val is not None else "test"
    eval_data = data.val if data.val is not None else data.test
    eval_loader = make_loader(eval_data, spec, 256, False, args.seed, rank, world_size, args.workers)

    model = create_model(
        args.arch, spec.num_classes, spec.channels, args.width_mult, with_exits=args.method != "baseline"
    )
    costs = exit_costs(model, (spec.channels, spec.image_size, spec.image_size))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = MultiExitLoss(args.method, args.distill, args.alpha, args.beta, args.temperature, args.teacher_exits)
    if args.teacher_exits:  # validate against the model now, not mid-epoch
        bad = [e for e in args.teacher_exits if not 1 <= e <= model.num_exits]
        if bad:
            raise UsageError(f"--teacher-exits {bad} do not exist; {args.arch} has exits 1..{model.num_exits}")
        if model.num_exits not in args.teacher_exits:  # DESIGN §1, the paper's ablation
            raise UsageError(
                f"--teacher-exits {args.teacher_exits} leaves out the main output; the ensemble teacher "
                f"must include it (e.g. --teacher-exits 1 {model.num_exits})"
            )

    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov
    )
    scheduler = build_scheduler(optimizer, args)
    amp_dtype, scaler = amp_setup(args.amp, device)

    start_epoch, best = 0, {"epoch": None, "val_acc_main": -1.0}
    if resume_payload is not None:
        try:
            model.load_state_dict(resume_payload["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {args.resume} does not fit {args.arch}: {exc}") from exc
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
        if scaler is not None and resume_payload.get("scaler"):
            scaler.load_state_dict(resume_payload["scaler"])
        start_epoch = resume_payload["epoch"]
        best = resume_payload.get("best", best)
        if args.epochs < start_epoch:
            raise UsageError(
                f"--epochs {args.epochs} is below the {start_epoch} epochs this checkpoint has trained; give "
                f"--epochs {start_epoch} (only the final evaluation) or more"
            )
        planned = resume_payload["config"].get("epochs", args.epochs)
        if args.epochs != planned and args.lr_schedule == "cosine":
            # The restored schedule anneals to 0 at the planned epoch and would rise again after it.
            raise UsageError(
                f"this run's cosine learning rate was set for {planned} epochs (it reaches 0 there); resuming "
                f"with --epochs {args.epochs} would not stretch it but start a second cycle. Resume without "
                f"--epochs, or train a new run with --epochs {args.epochs}"
            )
        if args.epochs != planned and resume_payload["config"].get("milestones") == default_milestones(planned):
            print(
                f"warning: the learning-rate milestones {args.milestones} were scaled to this run's {planned} "
                f"epochs; with --epochs {args.epochs} they stay where they are (start a new run to rescale them)",
                file=sys.stderr,
            )

    # The code the run started with (computed once: a commit made mid-run must not relabel it).
    revision = resume_payload.get("git_revision") if resume_payload else git_revision()
    run_dir = Path(getattr(args, "run_dir", None) or Path(args.output_dir) / args.run_name)
    args.run_dir = str(run_dir)
    config = dict(vars(args))
    config.update({k: repo_relative(config.get(k)) for k in PATH_KEYS})
    dataset_info = {
        "name": spec.name,
        "classes": data.classes,
        "channels": spec.channels,
        "image_size": spec.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "train_size": len(data.train),
        "val_size": len(data.val) if data.val is not None else 0,
        "test_size": len(data.test),
        "source": data.source,
    }
    if resume_payload is not None and resume_payload.get("dataset"):
        # --data-dir may change on resume (a moved copy), the data may not: it was never compared, and a
        # run resumed on other images went on with a config.json that named them as its own.
        keys = ("name", "classes", "channels", "image_size", "train_size", "val_size", "test_size")
        changed = [
            f"{k} {resume_payload['dataset'].get(k)!r} -> {dataset_info[k]!r}"
            for k in keys
            if resume_payload["dataset"].get(k) != dataset_info[k]
        ]
        if changed:
            read = data.source.get("path", data.source) if isinstance(data.source, dict) else data.source
            raise UsageError(
                f"the data read ({read}) "
                f"is not what this run was trained on ({'; '.join(changed)}); "
                "point --data-dir at the run's data set, or start a new run"
            )
    if rank == 0 and resume_payload is None and (run_dir / "checkpoint.pt").exists():
        raise UsageError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --run-name"
        )
    for folder in (run_dir.parent, run_dir):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file, not a folder; give --output-dir / --run-name a folder")
    if resume_payload is not None and resume_payload.get("rng") is not None:
        # Last: model creation above drew from the same generator. The loaders reseed augmentation
        # per (seed, epoch, rank) themselves; this keeps anything else drawing from the global
        # generator on the uninterrupted run's sequence too.
        torch.set_rng_state(resume_payload["rng"]["torch"])
        if device.type == "cuda" and resume_payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(resume_payload["rng"]["cuda"])
    return Run(
        args,
        rank,
        world_size,
        device,
        data,
        train_loader,
        eval_loader,
        eval_split,
        model,
        costs,
        criterion,
        optimizer,
        scheduler,
        amp_dtype,
        scaler,
        run_dir,
        config,
        dataset_info,
        revision,
        start_epoch,
        best,
    )


def _saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint file holds; None when there is none."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False).get("epoch")


def write_run_records(run: Run) -> None:
    """The run folder and its config.json (rank 0), and the run's one-line summary."""
    args, run_dir, model = run.args, run.run_dir, run.model
    run_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(repo_relative(a) if os.path.isabs(a) else a for a in run.command)
    resumed_with: list[str] = []
    if run.start_epoch == 0:  # records of an interrupted attempt that left no checkpoint
        for stale in ("log.jsonl", "final.json", "best.pt"):
            (run_dir / stale).unlink(missing_ok=True)
    else:
        # The command that started the run stays the run's (the manifest's provenance copies it);
        # each resume is added beside it.
        try:
            earlier = json.loads((run_dir / "config.json").read_text())
            resumed_with = [*earlier.get("resumed_with", []), command]
            command = earlier.get("command", command)
        except (OSError, ValueError):
            resumed_with = [command]
        # Epochs logged after the checkpoint (a run stopped between its log line and its checkpoint)
        # are trained again: their old lines go, so the log has each epoch once.
        log_path = run_dir / "log.jsonl"
        if log_path.is_file():
            kept = [line for line in log_path.read_text().splitlines() if _logged_epoch(line) <= run.start_epoch]
            log_path.write_text("".join(line + "\n" for line in kept))
        # Stopped between checkpoint.pt and best.pt of an improving epoch: the checkpoint is that epoch.
        if run.best["epoch"] == run.start_epoch and _saved_epoch(run_dir / "best.pt") != run.start_epoch:
            checkpoint = run_dir / "checkpoint.pt"
            save_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=False), run_dir / "best.pt")
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "config": run.config,
                "model_config": model.config.to_dict(),
                "dataset": run.dataset_info,
                "exit_costs": [asdict(c) for c in run.costs],
                "git_revision": run.revision,
                "world_size": run.world_size,
                "command": command,
                **({"resumed_with": resumed_with} if resumed_with else {}),
            },
            indent=2,
        )
    )
    eval_size = len(run.data.val if run.eval_split == "val" else run.data.test)
    print(f"run folder: {run_dir}")
    print(
        f"{args.arch} x{args.width_mult} on {run.data.spec.name} ({len(run.data.train)} train / {eval_size} "
        f"{run.eval_split}), method {args.method}, {model.num_exits} exits, GFLOPs per exit: "
        + ", ".join(f"{c.gflops:.4f}" for c in run.costs)
        + f", device {run.device}, "
        f"{run.world_size} process(es)"
    )
    if run.start_epoch:
        print(f"resuming from epoch {run.start_epoch}")


def _logged_epoch(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line: dropped


def train_epochs(run: Run) -> None:
    """The epoch loop: train, evaluate on the selection split, log, checkpoint every epoch."""
    args, model = run.args, run.model
    train_model: torch.nn.Module = model
    if run.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    log_path = run.run_dir / "log.jsonl"
    for epoch in range(run.start_epoch, args.epochs):
        lr = run.optimizer.param_groups[0]["lr"]
        metrics = train_one_epoch(
            train_model,
            run.criterion,
            run.train_loader,
            run.optimizer,
            run.device,
            epoch,
            run.scaler,
            run.amp_dtype,
            args.channels_last,
            args.progress and run.is_main,
        )
        run.scheduler.step()
        share_rank0_buffers(model)  # every rank evaluates the model rank 0 saves below
        last = epoch + 1 == args.epochs
        evaluated = last or (epoch + 1) % args.eval_every == 0
        if evaluated:
            metrics.update(
                evaluate(model, run.eval_loader, run.device, args.channels_last, prefix=f"{run.eval_split}_")
            )
        record = {"epoch": epoch + 1, "lr": lr, **metrics}
        # Every rank tracks the best epoch (the metrics are all-reduced, hence identical), so
        # all of them take part in evaluating it in finalize; only rank 0 writes files.
        main_key = f"val_acc_exit{model.num_exits}"
        improved = main_key in metrics and metrics[main_key] > run.best["val_acc_main"]
        if improved:
            run.best = {"epoch": epoch + 1, "val_acc_main": metrics[main_key]}
        if run.is_main:
            print(
                format_epoch_line(epoch + 1, args.epochs, lr, metrics, run.eval_split if evaluated else None),
                flush=True,
            )
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            payload = {
                "model_config": model.config.to_dict(),
                "config": run.config,
                "dataset": run.dataset_info,
                "exit_costs": [asdict(c) for c in run.costs],
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                "metrics": record,
                "git_revision": run.revision,
                # The generator's state where the next epoch starts, for an exact --resume.
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None,
                },
            }
            # checkpoint.pt first: a run stopped between the two writes resumes from this epoch, whose
            # weights the checkpoint holds (write_run_records restores best.pt from it). The other order
            # left best.pt of an epoch the resume trains again, reported later as the selected one.
            save_checkpoint({**payload, "best": run.best}, run.run_dir / "checkpoint.pt")
            if improved:
                save_checkpoint({**payload, "best": run.best}, run.run_dir / "best.pt")


def finalize(run: Run) -> dict:
    """Test-split accuracy after the final epoch and of the validation-selected epoch; final.json."""
    args, model, spec = run.args, run.model, run.data.spec
    results: dict = {}
    test_loader = make_loader(run.data.test, spec, 256, False, args.seed, run.rank, run.world_size, args.workers)
    final = evaluate(model, test_loader, run.device, args.channels_last, prefix="test_")
    results["final_epoch"] = {"epoch": args.epochs, **final}
    selected = None
    if run.best["epoch"] is not None:  # selected on the validation split; test used once for it
        if run.world_size > 1:
            dist.barrier()  # rank 0 has finished writing best.pt
        selected = torch.load(run.run_dir / "best.pt", map_location=run.device, weights_only=False)
        if selected.get("epoch") != run.best["epoch"]:  # a best.pt left by an earlier version's stop
            if run.is_main:
                print(
                    f"warning: best.pt holds epoch {selected.get('epoch')}, not the epoch validation selected "
                    f"({run.best['epoch']}); no test accuracy is reported for the selected epoch",
                    file=sys.stderr,
                )
            selected = None
    if selected is not None:
        model.load_state_dict(selected["model"])
        results["val_selected"] = {
            "epoch": run.best["epoch"],
            "val_acc_main": run.best["val_acc_main"],
            **evaluate(model, test_loader, run.device, args.channels_last, prefix="test_"),
        }
    if run.is_main:
        results["exit_costs"] = [asdict(c) for c in run.costs]
        (run.run_dir / "final.json").write_text(json.dumps(results, indent=2))
        accs = " ".join(f"{k.split('_')[-1]} {100 * v:.2f}" for k, v in final.items() if k.startswith("test_acc_"))
        print(f"test accuracy after the final epoch ({args.epochs}): {accs}")
        if "val_selected" in results:
            sel = results["val_selected"]
            accs = " ".join(f"{k.split('_')[-1]} {100 * v:.2f}" for k, v in sel.items() if k.startswith("test_acc_"))
            print(f"test accuracy of the epoch selected on val ({sel['epoch']}): {accs}")
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results if run.is_main else {}


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        main(args, explicit_flags(parser, argv), [repo_relative(__file__), *argv])
    except (UsageError, UnknownModelError, DatasetNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as exc:  # e.g. a --val-split larger than the data, a NaN loss
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
