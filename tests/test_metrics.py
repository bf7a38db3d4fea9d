"""Metrics and the Tally: exact sample-weighted epoch values, computed on the device."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

import trainwell as tw
from trainwell.metrics import Accuracy, Tally, TopKAccuracy, resolve_metric

from conftest import blobs, linear_regression, make_mlp


def test_epoch_values_equal_a_hand_computation_with_a_short_last_batch() -> None:
    x, y = blobs(samples=103)  # batches of 10: the last one has 3 samples
    model = make_mlp()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put, so the epoch sees one model
    history = tw.fit(model, (x, y), loss="cross_entropy", optimizer=frozen, batch_size=10,
                     metrics=["accuracy", "top2_accuracy"], progress=False)  # fmt: skip
    with torch.no_grad():
        outputs = model(x)
    assert history["loss"][0] == pytest.approx(functional.cross_entropy(outputs, y).item(), rel=1e-6)
    assert history["accuracy"][0] == pytest.approx((outputs.argmax(1) == y).double().mean().item(), abs=1e-12)
    top2 = (outputs.topk(2, dim=1).indices == y[:, None]).any(1).double().mean().item()
    assert history["top2_accuracy"][0] == pytest.approx(top2, abs=1e-12)


def test_regression_metrics_equal_a_hand_computation() -> None:
    x, y = linear_regression(samples=57)
    model = nn.Linear(3, 1)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    history = tw.fit(model, (x, y), loss="mse", optimizer=frozen, batch_size=16, metrics=["mae", "mse", "rmse"],
                     progress=False)  # fmt: skip
    with torch.no_grad():
        errors = model(x) - y
    assert history["mae"][0] == pytest.approx(errors.abs().mean().item(), rel=1e-6)
    assert history["mse"][0] == pytest.approx(errors.square().mean().item(), rel=1e-6)
    assert history["loss"][0] == pytest.approx(history["mse"][0], rel=1e-6)
    assert history["rmse"][0] == pytest.approx(math.sqrt(errors.square().mean().item()), rel=1e-6)


@pytest.mark.parametrize(
    ("outputs", "targets", "threshold", "expected"),
    [
        (torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]), 0.5, 2 / 3),
        (torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.5, 1 / 2),  # one-hot
        (torch.tensor([[0.3], [-0.2], [1.5]]), torch.tensor([[1.0], [0.0], [1.0]]), 0.0, 1.0),  # logits
        (torch.tensor([0.3, 0.6, 0.9]), torch.tensor([1, 1, 1]), 0.5, 2 / 3),  # probabilities, (N,)
    ],
)
def test_accuracy_multiclass_one_hot_and_binary(
    outputs: torch.Tensor, targets: torch.Tensor, threshold: float, expected: float
) -> None:
    tally = Tally([Accuracy(threshold)], has_loss=False)
    tally.reset(torch.device("cpu"))
    tally.update(None, outputs, targets, len(outputs))
    assert tally.read()["accuracy"] == pytest.approx(expected)


def test_binary_accuracy_threshold_follows_the_loss() -> None:
    assert resolve_metric("accuracy", threshold=0.0, mode="binary").threshold == 0.0  # type: ignore[union-attr]
    x, y = blobs(classes=2)
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    targets = y.float().unsqueeze(1)
    history = tw.fit(model, (x, targets), loss="bce", optimizer=frozen, metrics=["accuracy"], progress=False)
    with torch.no_grad():
        expected = ((model(x) > 0.5).float() == targets).float().mean().item()
    assert history["accuracy"][0] == pytest.approx(expected)


def test_top_k_accepts_k_larger_than_classes_and_rejects_zero() -> None:
    metric = TopKAccuracy(5)
    metric.reset(torch.device("cpu"))
    metric.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert metric.finalize(metric.total.item(), metric.count) == 1.0
    with pytest.raises(tw.ConfigError, match="k >= 1"):
        TopKAccuracy(0)


def test_function_metrics_are_sample_weighted() -> None:
    def always_batch_size(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(len(targets)))

    tally = Tally([resolve_metric(always_batch_size, threshold=0.5, mode="auto")], has_loss=False)
    tally.reset(torch.device("cpu"))
    for size in (10, 10, 2):
        tally.update(None, torch.zeros(size, 1), torch.zeros(size), size)
    assert tally.read()["always_batch_size"] == pytest.approx((10 * 10 + 10 * 10 + 2 * 2) / 22)


class CountingMetric:
    """Shaped like a torchmetrics.Metric (update / compute / reset), without importing it."""

    def __init__(self) -> None:
        self.seen = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.seen += len(targets)

    def compute(self) -> torch.Tensor:
        return torch.tensor(float(self.seen))

    def reset(self) -> None:
        self.seen = 0


def test_torchmetrics_style_objects_are_updated_and_reset_each_epoch() -> None:
    x, y = blobs(samples=90)
    history = tw.fit(make_mlp(), (x, y), loss="cross_entropy", epochs=2, metrics=[CountingMetric()], val_split=1 / 3,
                     progress=False)  # fmt: skip
    assert history["counting_metric"] == [60.0, 60.0]
    assert history["val_counting_metric"] == [30.0, 30.0]


def test_duplicate_metric_names_are_rejected() -> None:
    with pytest.raises(tw.ConfigError, match="unique"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", metrics=["accuracy", "accuracy"], progress=False)


def test_tally_reads_everything_in_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    tally = Tally([Accuracy(), TopKAccuracy(2)])
    tally.reset(torch.device("cpu"))
    tally.update(torch.tensor(1.0), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 4)
    calls: list[Any] = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    assert set(tally.read()) == {"loss", "accuracy", "top2_accuracy"}
    assert len(calls) == 1
