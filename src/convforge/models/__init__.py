"""Model families and the registry (``create_model``, ``list_models``, ``model_info``)."""

from convforge.models import resnet_cifar, small_cnn  # noqa: F401  (registers the families)
from convforge.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from convforge.models.weights import load_foreign_weights

__all__ = [
    "ModelInfo",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "load_foreign_weights",
]
