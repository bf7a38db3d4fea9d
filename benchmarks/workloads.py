"""The benchmark's workloads: synthetic MNIST-shaped data, the models, and the users' DataLoaders of
workloads (d) and (f); (g)-(i), sequences through a collate function, take theirs from ``text``.

Owns: what each workload trains or scores, on how many samples, in which batches, and the data
every contender receives. Must not time anything or know the contenders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

LR = 0.01
MOMENTUM = 0.9
NUM_CLASSES = 10
FEATURES = 784
IMAGE_SHAPE = (1, 28, 28)
DATA_SEED = 0
MODEL_SEED = 1
_CHUNK = 1_000
TEMPLATE_WEIGHT = 0.3
LOADER_WORKERS = 2  # workload (f)'s DataLoader(num_workers=...)
FLIP_PROBABILITY = 0.5

Architecture = Literal["mlp_small", "mlp_large", "cnn", "bert_tiny", "lstm_tagger"]
Kind = Literal["train", "loader", "workers", "inference", "text", "text_inference"]
TEXT_ARCHITECTURES = ("bert_tiny", "lstm_tagger")


@dataclass(frozen=True)
class Workload:
    """One row group of the report.

    Attributes:
        key: The letter used on the command line (``--workloads a,b``).
        title: What is trained, for the table.
        architecture: Which model ``build_model`` makes.
        kind: ``train`` (in-memory tensors), ``loader`` (a user's DataLoader), ``workers`` (a
            user's DataLoader with persistent worker processes and a random augmentation),
            ``inference`` (evaluate and predict), ``text`` (sequences through a user's DataLoader
            with a collate function) or ``text_inference`` (evaluate and predict of those).
        batch_size: Training batch size; for ``inference``, the hand-written loop's large batch.
        samples: Samples in a full run; quick_samples: in a ``--quick`` run.
    """

    key: str
    title: str
    architecture: Architecture
    kind: Kind
    batch_size: int
    samples: int
    quick_samples: int


WORKLOADS: dict[str, Workload] = {
    workload.key: workload
    for workload in (
        Workload("a", "MLP 784-64-10, overhead-bound", "mlp_small", "train", 128, 60_000, 8_000),
        Workload("b", "MLP 784-1024-1024-10, compute-bound", "mlp_large", "train", 128, 60_000, 4_000),
        Workload("c", "CNN conv32-conv64-pool-fc128 on 1x28x28", "cnn", "train", 64, 10_000, 1_000),
        Workload(
            "d", "MLP 784-64-10 from a user DataLoader(custom Dataset)", "mlp_small", "loader", 128, 60_000, 8_000
        ),
        Workload("e", "evaluate/predict, MLP 784-64-10", "mlp_small", "inference", 1024, 60_000, 8_000),
        Workload(
            "f",
            f"CNN from a user DataLoader(custom Dataset with a random flip, {LOADER_WORKERS} persistent workers)",
            "cnn",
            "workers",
            64,
            6_000,
            1_000,
        ),
        Workload(
            "g",
            "BERT classifier (2 layers, hidden 64; course-style dict batches padded by a collate function, "
            "the model's own loss, AdamW)",
            "bert_tiny",
            "text",
            32,
            4_000,
            512,
        ),
        Workload(
            "h",
            "LSTM tagger over padded (tokens, tags), padding tags -100, AdamW",
            "lstm_tagger",
            "text",
            32,
            4_000,
            512,
        ),
        Workload(
            "i",
            "evaluate/predict, the (g) BERT through its collate DataLoader",
            "bert_tiny",
            "text_inference",
            64,
            8_000,
            1_024,
        ),
    )
}


def make_data(samples: int, architecture: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-like float32 inputs in [0, 1) and int64 labels 0..9 that a model can learn.

    Each sample is a noisy copy of one of ten fixed random templates (``TEMPLATE_WEIGHT`` of the
    template, the rest uniform noise) and its label is that template's, so one epoch of SGD
    reaches roughly MNIST-like training accuracy. The same ``samples`` give the same data in
    every process; it is built in chunks, so the peak memory is the data itself.

    Returns:
        ``(inputs, targets)``: inputs of shape (samples, 784), or (samples, 1, 28, 28) for the CNN;
        for (g)-(i), padded token ids and their labels or tags (see ``text.make_sequences``).
    """
    if architecture in TEXT_ARCHITECTURES:
        from text import make_sequences

        return make_sequences(samples, tagger=architecture == "lstm_tagger")
    generator = torch.Generator().manual_seed(DATA_SEED)
    templates = torch.rand(NUM_CLASSES, FEATURES, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (samples,), generator=generator)
    inputs = torch.empty(samples, FEATURES)
    for start in range(0, samples, _CHUNK):
        rows = inputs[start : start + _CHUNK]
        torch.rand(rows.shape, generator=generator, out=rows)
        rows.mul_(1 - TEMPLATE_WEIGHT).add_(templates[targets[start : start + _CHUNK]], alpha=TEMPLATE_WEIGHT)
    if architecture == "cnn":
        inputs = inputs.view(samples, *IMAGE_SHAPE)
    return inputs, targets


def build_model(architecture: Architecture) -> nn.Module:
    """A freshly initialised model, with the same weights in every process."""
    if architecture in TEXT_ARCHITECTURES:
        from text import build_bert, build_tagger

        return build_bert() if architecture == "bert_tiny" else build_tagger()
    torch.manual_seed(MODEL_SEED)
    if architecture == "mlp_small":
        return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))
    if architecture == "mlp_large":
        return nn.Sequential(
            nn.Linear(FEATURES, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, NUM_CLASSES),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 12 * 12, 128),
        nn.ReLU(),
        nn.Linear(128, NUM_CLASSES),
    )


class SampleDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style Dataset returning one ``(input, target)`` pair per index, as users write them.

    Deliberately not a ``TensorDataset``, so no library can recognise it and take a fast path.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


class FlippedSampleDataset(SampleDataset):
    """Workload (f)'s Dataset: as ``SampleDataset``, with a random horizontal flip per sample drawn
    from torch's global generator, as ``torchvision.transforms.RandomHorizontalFlip`` does. In a
    DataLoader worker that is the worker's own generator (seeded by the DataLoader), so the
    per-worker random state matters."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.inputs[index]
        if torch.rand(1) < FLIP_PROBABILITY:
            image = image.flip(-1)
        return image, self.targets[index]


Loader = DataLoader[tuple[torch.Tensor, ...]]


def make_loader(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Loader:
    """Workload (d)'s data: ``DataLoader(SampleDataset(...), batch_size=batch_size, shuffle=True)``."""
    return DataLoader(SampleDataset(inputs, targets), batch_size=batch_size, shuffle=True)


def make_worker_loader(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> Loader:
    """Workload (f)'s data: ``DataLoader(FlippedSampleDataset(...), batch_size=batch_size,
    shuffle=True, num_workers=LOADER_WORKERS, persistent_workers=True)``."""
    return DataLoader(
        FlippedSampleDataset(inputs, targets),
        batch_size=batch_size,
        shuffle=True,
        num_workers=LOADER_WORKERS,
        persistent_workers=True,
    )


def workload_loader(workload: Workload, inputs: torch.Tensor, targets: torch.Tensor) -> Loader | None:
    """The user's DataLoader of a ``loader``, ``workers`` or text workload over these samples; else None."""
    if workload.kind == "loader":
        return make_loader(inputs, targets, workload.batch_size)
    if workload.kind == "workers":
        return make_worker_loader(inputs, targets, workload.batch_size)
    if workload.kind in ("text", "text_inference"):
        from text import text_loader

        tagger = workload.architecture == "lstm_tagger"
        return text_loader(inputs, targets, workload.batch_size, tagger, shuffle=workload.kind == "text")
    return None
