"""Multi-exit architectures, registered by name.

>>> from training.models import create_model
>>> model = create_model("resnet18", num_classes=100)
>>> out = model(images)          # MultiExitOutput(logits=(Z_1, ..., Z_k), features=(F_1, ..., F_k))
"""

from . import plain, resnet  # noqa: F401  (importing registers the builders)
from .multi_exit import ClassifierHead, ModelConfig, MultiExitNetwork, MultiExitOutput, StageSpec, exit_conv_widths
from .registry import (
    UnknownModelError,
    create_model,
    create_model_from_config,
    describe_models,
    list_models,
    register_model,
)

__all__ = [
    "ClassifierHead",
    "ModelConfig",
    "MultiExitNetwork",
    "MultiExitOutput",
    "StageSpec",
    "UnknownModelError",
    "create_model",
    "create_model_from_config",
    "describe_models",
    "exit_conv_widths",
    "list_models",
    "register_model",
]
