"""The contenders: the hand-written loops trainwell is measured against, and trainwell itself.

Owns: how each contender trains one epoch (``TRAINERS``) or evaluates and predicts
(``SCORERS``). Each function is one timed unit: it builds what a user would build per run (the
optimizer, the tutorial's DataLoader), runs, and ends with the host reading the results.
Framework contenders (Lightning, Keras, Poutyne) live in ``frameworks``. Must not time anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's documentation uses
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainwell
from tasks import InferenceTask, Outcome, TrainTask
from workloads import LR, MOMENTUM

TUTORIAL_EVAL_BATCH = 256
Batches = Iterable[tuple[torch.Tensor, ...]]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def tutorial_fit(task: TrainTask) -> Outcome:
    """The PyTorch tutorial loop: DataLoader over a TensorDataset, ``.item()`` twice per step."""
    loader = task.dataloader()
    model = task.model
    optimizer = _sgd(model)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for inputs, targets in loader:
        outputs = model(inputs)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (outputs.argmax(1) == targets).sum().item()
        seen += len(targets)
    return Outcome(seen, total_loss / seen, correct / seen)


def _shuffled_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    order = torch.randperm(len(targets))
    for start in range(0, len(targets), batch_size):
        index = order[start : start + batch_size]
        yield inputs.index_select(0, index), targets.index_select(0, index)


def best_hand_fit(task: TrainTask) -> Outcome:
    """The fastest loop we can write: in-memory slicing of a shuffled index (or the user's
    DataLoader), device-side sums, one host sync per epoch, gradients set to None."""
    batches: Batches = (
        task.loader if task.loader is not None else _shuffled_batches(task.inputs, task.targets, task.batch_size)
    )
    model = task.model
    optimizer = _sgd(model)
    model.train()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.int64)
    seen = 0
    for inputs, targets in batches:
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        size = targets.shape[0]
        loss_sum.add_(loss.detach(), alpha=size)
        correct.add_((outputs.detach().argmax(1) == targets).sum())
        seen += size
    total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    return Outcome(seen, total_loss / seen, total_correct / seen)


def _trainwell_fit(task: TrainTask, progress: bool | str, metrics: tuple[str, ...] = ("accuracy",)) -> Outcome:
    data = task.loader if task.loader is not None else (task.inputs, task.targets)
    history = trainwell.fit(
        task.model,
        data,
        loss="cross_entropy",
        optimizer="sgd",
        lr=LR,
        momentum=MOMENTUM,
        epochs=1,
        batch_size=task.batch_size,
        metrics=list(metrics),
        progress=progress,
    )
    return Outcome(len(task.targets), history["loss"][0], history["accuracy"][0])


def trainwell_fit(task: TrainTask) -> Outcome:
    """``trainwell.fit(..., metrics=["accuracy"], progress=True)``: the live display on."""
    return _trainwell_fit(task, progress=True)


def trainwell_quiet_fit(task: TrainTask) -> Outcome:
    """``trainwell.fit(..., progress=False)``: the same without the display."""
    return _trainwell_fit(task, progress=False)


def trainwell_counting_fit(task: TrainTask) -> Outcome:
    """``trainwell_quiet`` with a counting metric too, ``metrics=["accuracy", "f1_macro"]``: what
    the confusion-matrix sums cost a step."""
    return _trainwell_fit(task, progress=False, metrics=("accuracy", "f1_macro"))


def trainwell_notebook_fit(task: TrainTask) -> Outcome:
    """``trainwell.fit(..., progress="auto")`` in a notebook kernel (``kernel.kernel_display``):
    the notebook display, its messages signed, serialised and sent as a kernel sends them."""
    return _trainwell_fit(task, progress="auto")


@dataclass(frozen=True)
class Scorer:
    """A contender of workload (e): its evaluate and its predict, timed separately."""

    evaluate: Callable[[InferenceTask], Outcome]
    predict: Callable[[InferenceTask], Outcome]


def tutorial_evaluate(task: InferenceTask) -> Outcome:
    """The tutorial's test loop: DataLoader(TensorDataset), ``no_grad``, ``.item()`` per batch."""
    loader = DataLoader(TensorDataset(task.inputs, task.targets), batch_size=TUTORIAL_EVAL_BATCH)
    task.model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            outputs = task.model(inputs)
            total_loss += F.cross_entropy(outputs, targets).item() * len(targets)
            correct += (outputs.argmax(1) == targets).sum().item()
            seen += len(targets)
    return Outcome(seen, total_loss / seen, correct / seen)


def tutorial_predict(task: InferenceTask) -> Outcome:
    """The tutorial's way to collect outputs: DataLoader batches under ``no_grad``, then ``cat``."""
    loader = DataLoader(TensorDataset(task.inputs), batch_size=TUTORIAL_EVAL_BATCH)
    task.model.eval()
    with torch.no_grad():
        outputs = torch.cat([task.model(inputs) for (inputs,) in loader])
    return Outcome(len(outputs))


def best_hand_evaluate(task: InferenceTask) -> Outcome:
    """``inference_mode``, large sliced batches (views, no copy), device-side sums, one sync."""
    task.model.eval()
    with torch.inference_mode():
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.int64)
        for start in range(0, len(task.targets), task.batch_size):
            targets = task.targets[start : start + task.batch_size]
            outputs = task.model(task.inputs[start : start + task.batch_size])
            loss_sum.add_(F.cross_entropy(outputs, targets, reduction="sum"))
            correct.add_((outputs.argmax(1) == targets).sum())
        total_loss, total_correct = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()
    seen = len(task.targets)
    return Outcome(seen, total_loss / seen, total_correct / seen)


def best_hand_predict(task: InferenceTask) -> Outcome:
    """``inference_mode`` over large sliced batches, then one ``cat``."""
    task.model.eval()
    with torch.inference_mode():
        outputs = torch.cat(
            [
                task.model(task.inputs[start : start + task.batch_size])
                for start in range(0, len(task.inputs), task.batch_size)
            ]
        )
    return Outcome(len(outputs))


def _trainwell_scorer(default_batch: bool) -> Scorer:
    """trainwell's evaluate/predict with the hand loop's large batch, or with trainwell's default."""

    def options(task: InferenceTask) -> dict[str, int]:
        return {} if default_batch else {"batch_size": task.batch_size}

    def evaluate(task: InferenceTask) -> Outcome:
        data = (task.inputs, task.targets)
        logs = trainwell.evaluate(task.model, data, loss="cross_entropy", metrics=["accuracy"], **options(task))
        return Outcome(len(task.targets), logs["loss"], logs["accuracy"])

    def predict(task: InferenceTask) -> Outcome:
        return Outcome(len(trainwell.predict(task.model, task.inputs, **options(task))))

    return Scorer(evaluate, predict)


TRAINERS: dict[str, Callable[[TrainTask], Outcome]] = {
    "tutorial": tutorial_fit,
    "best_hand": best_hand_fit,
    "trainwell": trainwell_fit,
    "trainwell_quiet": trainwell_quiet_fit,
    "trainwell_counting": trainwell_counting_fit,
    "trainwell_notebook": trainwell_notebook_fit,
}
SCORERS: dict[str, Scorer] = {
    "tutorial": Scorer(tutorial_evaluate, tutorial_predict),
    "best_hand": Scorer(best_hand_evaluate, best_hand_predict),
    "trainwell": _trainwell_scorer(default_batch=False),
    "trainwell_default": _trainwell_scorer(default_batch=True),
}
WITH_DISPLAY = {"trainwell"}
