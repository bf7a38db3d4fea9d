"""Tiny shared fixtures: a 2-layer MLP and small learnable data sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn

from trainwell.history import TIME_KEYS


def make_mlp(inputs: int = 4, outputs: int = 3, hidden: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, outputs))


def blobs(samples: int = 300, classes: int = 3, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated Gaussian blobs: a linear model reaches high accuracy in a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=generator) * 3
    targets = torch.arange(samples) % classes
    inputs = centers[targets] + torch.randn(samples, features, generator=generator) * 0.5
    return inputs, targets


def linear_regression(samples: int = 200, features: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    weights = torch.tensor([[1.5], [-2.0], [0.5]])[:features]
    return inputs, inputs @ weights + 0.1 * torch.randn(samples, 1, generator=generator)


def without_time(logs: Mapping[str, Any]) -> dict[str, Any]:
    """A History's (or its dict's) values of the model: the timing columns, which differ from run
    to run, left out, so that runs can be compared exactly."""
    return {key: values for key, values in logs.items() if key not in TIME_KEYS}


@pytest.fixture
def mlp() -> nn.Module:
    return make_mlp()


@pytest.fixture
def classification() -> tuple[torch.Tensor, torch.Tensor]:
    return blobs()
