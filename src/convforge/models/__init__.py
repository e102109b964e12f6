"""Model families and the registry (``create_model``, ``list_models``, ``model_info``).

Every module in this package other than the infrastructure ones below holds one model
family and registers it on import; they are all imported here.
"""

import importlib
import pkgutil

from convforge.models.base import Classifier
from convforge.models.pretrained import PretrainedCfg, pretrained_cfg
from convforge.models.registry import (
    ModelInfo,
    create_model,
    list_models,
    model_info,
    register_model,
    unregister_model,
)
from convforge.models.weights import load_foreign_weights

_INFRASTRUCTURE = {"base", "pretrained", "registry", "weights"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "Classifier",
    "ModelInfo",
    "PretrainedCfg",
    "create_model",
    "list_models",
    "model_info",
    "pretrained_cfg",
    "register_model",
    "unregister_model",
    "load_foreign_weights",
]
