"""Fixes in the leaves: metric names and direction, metric results and their check, buffers kept by
probing, and optimizers whose step needs a closure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

import trainwell as tw
from trainwell.metrics import (
    Accuracy,
    FunctionMetric,
    Tally,
    check_metric,
    higher_is_better,
    metric_name,
    resolve_metric,
)
from trainwell.models import probing
from trainwell.optimizers import build_optimizer, check_step_without_closure

from conftest import blobs, make_mlp

CPU = torch.device("cpu")


class MulticlassF1Score:
    """Shaped like torchmetrics' MulticlassF1Score: macro F1, or per-class values with average=None."""

    def __init__(self, num_classes: int = 3, average: str | None = "macro") -> None:
        self.num_classes = num_classes
        self.average = average
        self.reset()

    def reset(self) -> None:
        self.predicted: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.predicted.append(outputs.argmax(1))
        self.targets.append(targets)

    def compute(self) -> torch.Tensor:
        predicted, targets = torch.cat(self.predicted), torch.cat(self.targets)
        scores = []
        for label in range(self.num_classes):
            true_positives = ((predicted == label) & (targets == label)).sum()
            scores.append(2 * true_positives / ((predicted == label).sum() + (targets == label).sum()).clamp(min=1))
        per_class = torch.stack(scores).float()
        return per_class if self.average is None else per_class.mean()


class BinaryAUROC:
    """Shaped like torchmetrics' BinaryAUROC; this one fails on multi-class outputs, as a misuse would."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.scores: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if outputs.dim() > 1 and outputs.shape[1] > 1:
            raise ValueError(f"expected binary scores of shape (N,), got {tuple(outputs.shape)}")
        self.scores.append(outputs.reshape(-1))

    def compute(self) -> torch.Tensor:
        return torch.cat(self.scores).mean()


def named_class(name: str) -> type:
    """A torchmetrics-style class with the given name."""
    return type(name, (), {"update": lambda self, *args: None, "compute": lambda self: 0.0, "reset": lambda self: None})


# 1. Metric names and direction


@pytest.mark.parametrize(
    ("class_name", "key"),
    [
        ("MulticlassF1Score", "f1_score"),
        ("BinaryAUROC", "auroc"),
        ("MulticlassAccuracy", "accuracy"),
        ("MeanSquaredError", "mean_squared_error"),
        ("BinaryAveragePrecision", "average_precision"),
        ("MultilabelJaccardIndex", "jaccard_index"),
        ("MeanAveragePrecision", "mean_average_precision"),
        ("R2Score", "r2_score"),
        ("CountingMetric", "counting_metric"),
        ("Binary", "binary"),  # nothing after the prefix: the name is kept
    ],
)
def test_torchmetrics_style_names_drop_the_task_and_keep_acronyms_whole(class_name: str, key: str) -> None:
    assert metric_name(named_class(class_name)()) == key


def test_torchmetrics_style_keys_are_the_logged_keys() -> None:
    tally = Tally([MulticlassF1Score(), Accuracy()], prefix="val_")
    assert tally.keys == ["val_loss", "val_f1_score", "val_accuracy"]


@pytest.mark.parametrize(
    "key",
    [
        "accuracy", "val_accuracy", "top5_accuracy", "balanced_accuracy", "f1", "f1_score", "val_f1_macro",
        "precision", "recall", "auroc", "val_auc", "average_precision", "iou", "mean_iou", "dice", "r2",
        "r2_score", "jaccard_index", "specificity", "mean_average_precision", "mAP", "val_map_50",
    ],
)  # fmt: skip
def test_higher_is_better_for_scores(key: str) -> None:
    assert higher_is_better(key) is True


@pytest.mark.parametrize(
    "key",
    [
        "loss", "val_loss", "mae", "val_mse", "rmse", "mean_squared_error", "val_mean_absolute_error",
        "dice_loss", "f1_loss", "error_rate", "perplexity", "throughput", "mapping_time",
    ],
)  # fmt: skip
def test_lower_is_better_for_losses_errors_and_unknown_keys(key: str) -> None:
    assert higher_is_better(key) is False


# 2. Metric results: Python and numpy numbers and one-element tensors; the pre-flight check


def fraction_correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


@pytest.mark.parametrize(
    "convert",
    [
        lambda value: value.item(),  # Python float
        lambda value: np.float32(value.item()),
        lambda value: np.float64(value.item()),
        lambda value: np.array(value.item()),  # 0-d array
        lambda value: value.reshape(1),
        lambda value: value.reshape(1, 1),
    ],
    ids=["float", "numpy_float32", "numpy_float64", "numpy_0d_array", "tensor_(1,)", "tensor_(1,1)"],
)
def test_function_metrics_accept_numbers_and_one_element_tensors(convert: Callable[[torch.Tensor], Any]) -> None:
    def correct_share(outputs: torch.Tensor, targets: torch.Tensor) -> Any:
        return convert(fraction_correct(outputs, targets))

    outputs, targets = torch.randn(25, 3, generator=torch.Generator().manual_seed(0)), torch.arange(25) % 3
    metric = resolve_metric(correct_share, threshold=0.5, mode="auto")
    check_metric(metric, outputs, targets)
    tally = Tally([metric], has_loss=False)
    tally.reset(CPU)
    for start in (0, 10, 20):  # batches of 10, 10 and 5: the average is weighted by batch size
        tally.update(None, outputs[start : start + 10], targets[start : start + 10], len(targets[start : start + 10]))
    expected = (outputs.argmax(1) == targets).double().mean().item()
    assert tally.read()["correct_share"] == pytest.approx(expected, abs=1e-6)


def test_function_metrics_accept_python_ints() -> None:
    def correct_count(outputs: torch.Tensor, targets: torch.Tensor) -> int:
        return int((outputs.argmax(1) == targets).sum())

    metric = FunctionMetric(correct_count, "correct_count")
    metric.reset(CPU)
    metric.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0, 0]))
    assert metric.finalize(metric.total.item(), metric.count) == 2.0


def test_tensor_results_are_not_read_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    metric = FunctionMetric(lambda outputs, targets: fraction_correct(outputs, targets).reshape(1, 1), "share")
    metric.reset(CPU)
    outputs, targets = torch.randn(8, 3), torch.arange(8) % 3

    def synchronises(self: torch.Tensor, *args: Any) -> Any:
        raise AssertionError("a host synchronisation")

    for method in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, synchronises)
    metric.update(outputs, targets)
    monkeypatch.undo()
    assert metric.total.item() == pytest.approx(8 * fraction_correct(outputs, targets).item())


def test_fit_logs_a_metric_that_returns_a_python_float() -> None:
    x, y = blobs(samples=60)
    model = make_mlp()
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)

    def share(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return fraction_correct(outputs, targets).item()

    history = tw.fit(model, (x, y), loss="cross_entropy", optimizer=frozen, batch_size=16, metrics=[share],
                     progress=False)  # fmt: skip
    with torch.no_grad():
        expected = fraction_correct(model(x), y).item()
    assert history["share"][0] == pytest.approx(expected, abs=1e-6)


def per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float()


def as_text(outputs: torch.Tensor, targets: torch.Tensor) -> str:
    return "high"


def forgets_to_return(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    (outputs.argmax(1) == targets).float().mean()


def divides_by_zero(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return 1 / 0


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (per_sample, "per_sample returned tensor of shape (6,), dtype float32"),
        (as_text, "as_text returned 'high'"),
        (forgets_to_return, "forgets_to_return returned None"),
        (divides_by_zero, "raised ZeroDivisionError on a probe batch: division by zero"),
    ],
)
def test_check_metric_names_the_metric_what_it_returned_and_the_fix(fn: Callable[..., Any], expected: str) -> None:
    metric = resolve_metric(fn, threshold=0.5, mode="auto")
    with pytest.raises(tw.ConfigError) as raised:
        check_metric(metric, torch.randn(6, 3), torch.arange(6) % 3)
    message = str(raised.value)
    assert repr(fn.__name__) in message
    assert expected in message
    assert "fix: return a scalar tensor, e.g. (outputs.argmax(1) == targets).float().mean()" in message


def test_check_metric_leaves_the_accumulators_untouched() -> None:
    outputs, targets = torch.randn(6, 3), torch.arange(6) % 3
    accuracy = Accuracy()
    accuracy.reset(CPU)
    accuracy.update(outputs, targets)
    total, count = accuracy.total.clone(), accuracy.count
    f1 = MulticlassF1Score()
    f1.update(outputs, targets)
    check_metric(accuracy, outputs, targets)
    check_metric(f1, outputs, targets)
    assert torch.equal(accuracy.total, total) and accuracy.count == count
    assert len(f1.predicted) == 1


def test_check_metric_on_torchmetrics_style_objects() -> None:
    outputs, targets = torch.randn(6, 3), torch.arange(6) % 3
    check_metric(MulticlassF1Score(average="macro"), outputs, targets)
    check_metric(MulticlassF1Score(average=None), outputs, targets)  # per class: one key each (below)
    values = tw.evaluate(torch.nn.Identity(), (outputs, targets), metrics=[MulticlassF1Score(average=None)])
    assert sorted(values) == ["f1_score_0", "f1_score_1", "f1_score_2"]
    table = MulticlassF1Score(average=None)
    table.compute = lambda: torch.zeros(3, 3)  # type: ignore[method-assign]  # neither one number nor one per class
    with pytest.raises(tw.ConfigError, match=r"f1_score returned tensor of shape \(3, 3\)"):
        check_metric(table, outputs, targets)
    with pytest.raises(tw.ConfigError, match=r"'auroc' raised ValueError .*expected binary scores") as raised:
        check_metric(BinaryAUROC(), outputs, targets)
    assert "outputs tensor of shape (6, 3), dtype float32" in str(raised.value)
    check_metric(BinaryAUROC(), torch.rand(6), targets % 2)


def test_check_metric_rejects_a_metric_subclass_whose_sum_has_several_elements() -> None:
    class PerClassHits(tw.metrics.Metric):
        name = "per_class_hits"

        def batch_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
            return functional.one_hot(targets, 3).sum(0).double(), len(targets)

    with pytest.raises(tw.ConfigError, match="'per_class_hits' raised RuntimeError"):
        check_metric(PerClassHits(), torch.randn(6, 3), torch.arange(6) % 3)


# 3. probing keeps every buffer


class CountingModel(nn.Module):
    """Counts its calls in a buffer, in place or by assigning a new tensor."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.in_place = in_place
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            self.calls += 1
        else:
            self.calls = self.calls + 1
        return self.linear(inputs)


class AlwaysBatchStatistics(nn.Module):
    """Normalises with batch statistics even in eval mode, updating the running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        hidden = self.linear(inputs)
        return functional.batch_norm(
            hidden, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=True, momentum=0.5
        )


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "reassigned"])
def test_probing_restores_a_counter_buffer(in_place: bool) -> None:
    model = CountingModel(in_place)
    calls = model.calls
    with probing(model, CPU):
        model(torch.randn(5, 4))
        assert model.calls.item() == 1.0  # the forward did change it
    assert model.calls is calls
    assert model.calls.item() == 0.0
    assert dict(model.named_buffers())["calls"] is calls


def test_probing_restores_running_statistics_updated_in_a_custom_forward() -> None:
    torch.manual_seed(0)
    model = AlwaysBatchStatistics()
    model(torch.randn(8, 4) * 3 + 1)  # non-trivial running statistics before the probe
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    buffers = dict(model.named_buffers())
    with probing(model, CPU):
        model(torch.randn(8, 4) * 5 - 2)
        assert not torch.equal(model.norm.running_mean, before["norm.running_mean"])
    for name, buffer in model.named_buffers():
        assert buffer is buffers[name]
        assert torch.equal(buffer, before[name]), name
    assert model.training


def test_probing_restores_buffers_when_the_forward_fails() -> None:
    model = CountingModel(in_place=True)
    with pytest.raises(RuntimeError), probing(model, CPU):
        model(torch.randn(5, 4))
        model(torch.randn(5, 3))  # wrong number of features
    assert model.calls.item() == 0.0


# 4. Optimizers whose step needs a closure


def test_lbfgs_cannot_step_without_a_closure_and_is_rejected() -> None:
    model = nn.Linear(2, 1)
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(TypeError, match="closure"):
        lbfgs.step()  # type: ignore[call-arg]  # what trainwell's step would do
    with pytest.raises(tw.ConfigError) as raised:
        check_step_without_closure(lbfgs)
    message = str(raised.value)
    assert message.startswith(
        "LBFGS needs a closure that re-evaluates the loss; trainwell's step calls optimizer.step() once per batch "
        "without one."
    )
    assert "received: optimizer=torch.optim.lbfgs.LBFGS" in message
    assert "fit(..., step=my_step) where my_step calls optimizer.step(closure) itself" in message
    assert build_optimizer(lbfgs, model, None, {}) is lbfgs  # the caller decides whether to check


@pytest.mark.parametrize("factory", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_optimizers_with_an_optional_closure_pass(factory: Callable[..., torch.optim.Optimizer]) -> None:
    check_step_without_closure(factory(nn.Linear(2, 1).parameters(), lr=0.1))


def test_a_custom_optimizer_that_requires_a_closure_is_rejected() -> None:
    class Reevaluating(torch.optim.SGD):
        def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
            loss = closure()
            super().step()
            return loss

    with pytest.raises(tw.ConfigError, match="Reevaluating needs a closure"):
        check_step_without_closure(Reevaluating(nn.Linear(2, 1).parameters(), lr=0.1))
