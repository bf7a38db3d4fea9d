"""Other training libraries as contenders, each set up as its documentation recommends to show the
loss and accuracy while training: Lightning, Keras 3 (torch backend) and Poutyne.

Owns: detecting which are importable (without importing them) and their training functions for
workloads (a)-(c). Nothing here is installed by the benchmark: a library that is not importable
is reported as skipped.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's documentation uses

from tasks import Outcome, TrainTask
from workloads import FEATURES, IMAGE_SHAPE, LR, MOMENTUM, NUM_CLASSES, Architecture


def lightning_module() -> Any:
    """Lightning (``lightning``, else ``pytorch_lightning``), imported on first use."""
    try:
        import lightning
    except ImportError:
        import pytorch_lightning as lightning
    return lightning


@functools.cache
def _classifier_class() -> Any:
    """A LightningModule wrapping the model, logging loss and torchmetrics accuracy to the progress bar."""
    lightning = lightning_module()
    from torchmetrics.classification import MulticlassAccuracy

    class Classifier(lightning.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model
            self.train_accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
            inputs, targets = batch
            outputs = self.model(inputs)
            loss = F.cross_entropy(outputs, targets)
            self.train_accuracy(outputs, targets)
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train_acc", self.train_accuracy, on_step=True, on_epoch=True, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    return Classifier


def lightning_trainer(root: str) -> Any:
    """``Trainer(max_epochs=1)`` on the CPU with its progress bar; no logger, checkpoint or summary."""
    return lightning_module().Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def lightning_fit(task: TrainTask) -> Outcome:
    """``Trainer(max_epochs=1).fit(LightningModule, DataLoader(TensorDataset, shuffle=True))``,
    progress bar on; no logger or checkpoint files (for (d) and (f), the user's DataLoader)."""
    loader = task.dataloader()
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning_trainer(root)
        trainer.fit(_classifier_class()(task.model), loader)
    metrics = trainer.callback_metrics
    return Outcome(len(loader.dataset), float(metrics["train_loss_epoch"]), float(metrics["train_acc_epoch"]))  # type: ignore[arg-type]


@functools.cache
def _keras_model(architecture: Architecture) -> Any:
    """The workload's model in Keras layers, compiled with SGD, sparse cross-entropy and accuracy."""
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    layers = keras.layers
    if architecture == "cnn":
        stack = [
            keras.Input((*IMAGE_SHAPE[1:], IMAGE_SHAPE[0])),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
        ]
    else:
        widths = [64] if architecture == "mlp_small" else [1024, 1024]
        stack = [keras.Input((FEATURES,)), *(layers.Dense(width, activation="relu") for width in widths)]
    model = keras.Sequential([*stack, layers.Dense(NUM_CLASSES)])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LR, momentum=MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def keras_fit(task: TrainTask) -> Outcome:
    """``model.fit(x, y, batch_size=..., epochs=1, verbose=1)`` on numpy arrays (channels-last images)."""
    model = _keras_model(task.architecture)
    inputs = task.inputs.numpy()
    if task.architecture == "cnn":
        inputs = inputs.reshape(len(inputs), *IMAGE_SHAPE[1:], IMAGE_SHAPE[0])
    history = model.fit(inputs, task.targets.numpy(), batch_size=task.batch_size, epochs=1, verbose=1, shuffle=True)
    return Outcome(len(inputs), history.history["loss"][-1], history.history["accuracy"][-1])


def poutyne_fit(task: TrainTask) -> Outcome:
    """``poutyne.Model(network, optimizer, "cross_entropy", batch_metrics=["accuracy"]).fit(x, y)``
    (``fit_generator(loader)`` for a user's DataLoader)."""
    from poutyne import Model

    optimizer = torch.optim.SGD(task.model.parameters(), lr=LR, momentum=MOMENTUM)
    model = Model(task.model, optimizer, "cross_entropy", batch_metrics=["accuracy"])
    if task.loader is not None:  # (d), (f): the user's DataLoader
        logs = model.fit_generator(task.loader, epochs=1, verbose=True)
    else:
        logs = model.fit(task.inputs, task.targets, epochs=1, batch_size=task.batch_size, verbose=True)
    last = logs[-1]
    accuracy = last.get("acc", last.get("accuracy", float("nan")))
    return Outcome(len(task.targets), float(last["loss"]), float(accuracy) / 100)  # Poutyne reports percent


FRAMEWORK_TRAINERS: dict[str, Callable[[TrainTask], Outcome]] = {
    "lightning": lightning_fit,
    "keras": keras_fit,
    "poutyne": poutyne_fit,
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _keras_status() -> str | None:
    if not _importable("keras"):
        return "keras is not importable"
    major = importlib.metadata.version("keras").split(".")[0]
    return None if major.isdigit() and int(major) >= 3 else f"keras {major}.x found; the torch backend needs Keras 3"


def framework_status() -> dict[str, str | None]:
    """For each framework contender: None when importable, else why it is skipped."""
    lightning = _importable("lightning") or _importable("pytorch_lightning")
    hugging_face = _importable("transformers") and _importable("accelerate")
    return {
        "lightning": None if lightning else "neither lightning nor pytorch_lightning is importable",
        "keras": _keras_status(),
        "poutyne": None if _importable("poutyne") else "poutyne is not importable",
        "hf_trainer": None if hugging_face else "transformers and accelerate are not both importable",
    }
