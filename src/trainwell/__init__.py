"""trainwell: train any PyTorch model with one call, and see it learn.

Example:
    >>> import trainwell
    >>> sorted(trainwell.__all__)[:3]
    ['CSVLogger', 'Callback', 'ConfigError']
"""

from trainwell.api import Evaluation, evaluate, fit, predict
from trainwell.callbacks import Callback, EarlyStopping, LambdaCallback, TerminateOnNaN
from trainwell.errors import ConfigError, DataError, TrainingInterrupted, TrainwellError, TrainwellWarning
from trainwell.history import History
from trainwell.loggers import CSVLogger, TensorBoard
from trainwell.loop import compute_loss, optimizer_step, train_step
from trainwell.lr_finder import LRFinderResult, find_lr
from trainwell.objective import structured
from trainwell.plots import plot_confusion_matrix
from trainwell.report import Report, classification_report
from trainwell.run import Run, StepResult
from trainwell.schedules import LRScheduler
from trainwell.summary import ModelSummary, summary
from trainwell.trackers import MLflowLogger, WandbLogger
from trainwell.weights import ModelCheckpoint, load_weights, save_weights

__version__ = "0.1.0"
__all__ = [
    "CSVLogger",
    "Callback",
    "ConfigError",
    "DataError",
    "EarlyStopping",
    "Evaluation",
    "History",
    "LRFinderResult",
    "LRScheduler",
    "LambdaCallback",
    "MLflowLogger",
    "ModelCheckpoint",
    "ModelSummary",
    "Report",
    "Run",
    "StepResult",
    "TensorBoard",
    "TerminateOnNaN",
    "TrainingInterrupted",
    "TrainwellError",
    "TrainwellWarning",
    "WandbLogger",
    "__version__",
    "classification_report",
    "compute_loss",
    "evaluate",
    "find_lr",
    "fit",
    "load_weights",
    "optimizer_step",
    "plot_confusion_matrix",
    "predict",
    "save_weights",
    "structured",
    "summary",
    "train_step",
]
