"""Architectures are builders registered by name and looked up with ``create_model``."""

from __future__ import annotations

from collections.abc import Callable

from .multi_exit import ModelConfig, MultiExitNetwork

_REGISTRY: dict[str, Callable[..., MultiExitNetwork]] = {}
_DESCRIPTIONS: dict[str, str] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return self.args[0]


def register_model(name: str, description: str = "") -> Callable:
    """Decorator: make ``fn(num_classes, in_channels, width_mult, with_exits)`` buildable by name."""

    def wrap(fn: Callable[..., MultiExitNetwork]) -> Callable[..., MultiExitNetwork]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    return {name: _DESCRIPTIONS[name] for name in list_models()}


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    width_mult: float = 1.0,
    with_exits: bool = True,
    **extra,
) -> MultiExitNetwork:
    """Build a registered multi-exit network by name, e.g. ``create_model("resnet18", 100)``."""
    if arch not in _REGISTRY:
        raise UnknownModelError(f"unknown architecture {arch!r}; choose one of: {', '.join(list_models())}")
    if not width_mult > 0:
        raise ValueError(f"--width-mult must be positive, got {width_mult}")
    model = _REGISTRY[arch](
        num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, with_exits=with_exits, **extra
    )
    model.config = ModelConfig(arch, num_classes, in_channels, width_mult, with_exits, dict(extra))
    return model


def create_model_from_config(config: dict | ModelConfig) -> MultiExitNetwork:
    """Rebuild a model from a saved ``ModelConfig`` (as stored in checkpoints)."""
    if isinstance(config, ModelConfig):
        config = config.to_dict()
    config = dict(config)
    extra = config.pop("extra", {}) or {}
    return create_model(**config, **extra)
