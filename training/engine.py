"""One epoch of training and evaluation of a multi-exit network — plain functions."""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from training.accuracy import topk_correct

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, never a requirement
    tqdm = None


def _progress(iterable, enabled: bool, desc: str, total: int):
    if enabled and tqdm is not None:
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)
    return iterable


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


def share_rank0_buffers(model: nn.Module) -> None:
    """Give every DDP rank rank 0's buffers (BatchNorm running statistics).

    DDP keeps the weights identical, but each rank's last forward of an epoch updates its own
    running statistics from its own batch, so after an epoch the ranks hold different models. Each
    rank then evaluated its shard with its own statistics: the all-reduced accuracy was a mixture
    of models matching no file, as rank 0 saves the checkpoint. DDP broadcasts rank 0's buffers
    before every training forward anyway (``broadcast_buffers``), so training is unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in _unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train for one epoch; returns mean loss components, train accuracy per exit and images/s."""
    model.train()
    loader.set_epoch(epoch)
    sums: dict[str, float] = defaultdict(float)
    correct: list[int] | None = None
    seen = 0
    start = time.perf_counter()
    bar = _progress(loader, progress, f"epoch {epoch + 1}", len(loader))
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            output = model(images)
            parts = criterion(output, labels)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

        n = labels.shape[0]
        seen += n
        for key, value in parts.items():
            sums[key] += value.detach().item() * n
        with torch.no_grad():
            hits = [(z.argmax(1) == labels).sum().item() for z in output.logits]
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
        if bar is not loader:
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
    elapsed = time.perf_counter() - start
    totals = torch.tensor([seen, *sums.values(), *(correct or [])], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    seen_all = totals[0].item()
    metrics = {f"train_{k}": totals[1 + i].item() / seen_all for i, k in enumerate(sums)}
    for i, c in enumerate(totals[1 + len(sums) :].tolist(), start=1):
        metrics[f"train_acc_exit{i}"] = c / seen_all
    metrics["train_images_per_s"] = seen_all / elapsed if elapsed > 0 else math.nan
    metrics["train_seconds"] = elapsed
    return metrics


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader, device: torch.device, channels_last: bool = False, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a whole split: returns (logits (N, k, C), features (N, k, D), labels (N,)) on the CPU."""
    model.eval()
    all_logits, all_features, all_labels = [], [], []
    for images, labels in _progress(loader, progress, "eval", len(loader)):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = model(images)
        all_logits.append(torch.stack(out.logits, 1).float().cpu())
        all_features.append(torch.stack(out.features, 1).float().cpu())
        all_labels.append(labels)
    if not all_logits:
        # An empty shard (a split smaller than the DDP world): no rows, but the shapes the counts
        # need, so this rank still joins the all-reduce instead of failing and hanging the others.
        k, classes = getattr(model, "num_exits", 1), getattr(model, "num_classes", 1)
        return torch.zeros(0, k, classes), torch.zeros(0, k, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_features), torch.cat(all_labels)


def _accuracy_counts(logits_t: torch.Tensor, labels_t: torch.Tensor) -> dict[str, float]:
    logits, labels = logits_t.numpy(), labels_t.numpy()
    counts: dict[str, float] = {"n": float(len(labels))}
    num_exits, num_classes = logits.shape[1], logits.shape[2]
    for i in range(num_exits):
        counts[f"acc_exit{i + 1}"] = float(topk_correct(logits[:, i], labels, 1))
        if num_classes >= 100:
            counts[f"top5_exit{i + 1}"] = float(topk_correct(logits[:, i], labels, 5))
    if num_exits > 1:
        counts["acc_ensemble"] = float(topk_correct(logits.mean(1), labels, 1))
    return counts


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, channels_last: bool = False, prefix: str = "", progress=False
) -> dict[str, float]:
    """Accuracy of every exit and of the ensemble on a split; shards are summed under DDP."""
    logits, _, labels = collect_logits(_unwrap(model), loader, device, channels_last, progress)
    counts = _accuracy_counts(logits, labels)
    keys = list(counts)
    totals = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    n = totals[0].item()
    return {f"{prefix}{k}": totals[i].item() / n for i, k in enumerate(keys) if k != "n"}
