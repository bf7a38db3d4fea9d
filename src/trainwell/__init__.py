"""trainwell: train any PyTorch model with one call, and see it learn.

Example:
    >>> import trainwell
    >>> sorted(trainwell.__all__)[:3]
    ['Callback', 'ConfigError', 'DataError']
"""

from trainwell.api import evaluate, fit, predict
from trainwell.callbacks import Callback
from trainwell.errors import ConfigError, DataError, TrainwellError
from trainwell.history import History
from trainwell.loop import train_step
from trainwell.plots import plot_confusion_matrix
from trainwell.run import Run

__version__ = "0.1.0"
__all__ = [
    "Callback",
    "ConfigError",
    "DataError",
    "History",
    "Run",
    "TrainwellError",
    "__version__",
    "evaluate",
    "fit",
    "plot_confusion_matrix",
    "predict",
    "train_step",
]
