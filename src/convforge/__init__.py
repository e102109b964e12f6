"""convforge: convolutional neural networks for images: build, train, measure, compress, inspect."""

from convforge.version import __version__  # noqa: E402
from convforge.config import TrainConfig  # noqa: E402
from convforge.models import create_model, list_models, model_info, register_model  # noqa: E402
from convforge.api import fit  # noqa: E402
from convforge.train.checkpoint import load_checkpoint  # noqa: E402
from convforge.train.evaluate import evaluate  # noqa: E402

__all__ = ["TrainConfig", "__version__", "create_model", "evaluate", "fit", "list_models", "load_checkpoint",
           "model_info", "register_model"]
