"""What passes between the worker and a contender, and from the worker to the parent process.

Owns: the task handed to a timed unit (``TrainTask``, ``InferenceTask``), what it returns
(``Outcome``), and the prefix of the worker's result line. Imports neither trainwell nor any
framework, so the parent process never does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from workloads import Architecture

RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class TrainTask:
    """One training epoch to run.

    Attributes:
        model: The model, already built (trained in place).
        inputs, targets: The in-memory data.
        batch_size: Samples per batch.
        architecture: Which model this is (for frameworks that build their own).
        loader: For workloads (d) and (f), the user's DataLoader, which every contender is given
            (for (f) with its persistent workers already started).
    """

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    architecture: Architecture
    loader: DataLoader[tuple[torch.Tensor, ...]] | None = None

    def dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """The user's DataLoader for workloads (d) and (f), else the tutorial's: a shuffled TensorDataset."""
        if self.loader is not None:
            return self.loader
        return DataLoader(TensorDataset(self.inputs, self.targets), batch_size=self.batch_size, shuffle=True)


@dataclass
class Outcome:
    """What a timed unit did: samples processed, and the loss and accuracy it reports (NaN if none)."""

    samples: int
    loss: float = float("nan")
    accuracy: float = float("nan")


@dataclass
class InferenceTask:
    """Evaluation and prediction over ``inputs``/``targets``; ``batch_size`` is the large batch;
    ``loader``, for (i), the user's DataLoader over them."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    loader: DataLoader[Any] | None = None
