"""The input doctor: each common mistake is repaired (and said) or explained before any step."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, Subset, TensorDataset

import trainwell as tw
from trainwell.batches import to_batches
from trainwell.doctor import examine
from trainwell.errors import TrainwellWarning
from trainwell.objective import resolve_loss_options

from conftest import blobs, linear_regression, make_mlp


def frozen_fit(model: nn.Module, data: Any, **arguments: Any) -> tuple[tw.History, list[str]]:
    """One epoch that cannot change the weights, so the loss can be compared with a hand computation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tw.fit(model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), progress=False,
                         batch_size=1000, **arguments)  # fmt: skip
    return history, [str(warning.message) for warning in caught if warning.category is TrainwellWarning]


def unchanged_after_error(model: nn.Module, error: type[Exception], match: str, **arguments: Any) -> str:
    before = [parameter.detach().clone() for parameter in model.parameters()]
    arguments.setdefault("progress", False)
    with pytest.raises(error, match=match) as raised:
        tw.fit(model, **arguments)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    message = str(raised.value)
    assert "received:" in message and "fix:" in message
    return message


# 1. cross_entropy targets: integral floats, small integer types, (N, 1) columns, one-hot.
@pytest.mark.parametrize(
    ("convert", "said"),
    [
        (lambda y: y.float(), "cast from float32 to int64 class indices"),
        (lambda y: y.to(torch.int32), "cast from int32 to int64"),
        (lambda y: y.to(torch.uint8), "cast from uint8 to int64"),
        (lambda y: y.unsqueeze(1), "squeezed from (N, 1) to (N,)"),
        (lambda y: y.unsqueeze(1).double(), "squeezed from (N, 1) to (N,) and cast from float32 to int64"),
        (lambda y: functional.one_hot(y, 3), "read as one-hot and cast from int64 to float32"),
    ],
)
def test_cross_entropy_targets_are_repaired_and_the_loss_is_the_correct_one(convert: Any, said: str) -> None:
    x, y = blobs()
    model = make_mlp()
    history, notes = frozen_fit(model, (x, convert(y)), loss="cross_entropy")
    with torch.no_grad():
        expected = functional.cross_entropy(model(x), y).item()
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6)
    assert any(said in note for note in notes), notes


def test_one_hot_float_targets_need_no_repair() -> None:
    x, y = blobs()
    history, notes = frozen_fit(make_mlp(), (x, functional.one_hot(y, 3).float()), loss="cross_entropy")
    assert notes == [] and history.epochs == 1


# 2. labels outside [0, C)
def test_one_based_labels_are_explained() -> None:
    x, y = blobs()
    message = unchanged_after_error(make_mlp(), tw.DataError, r"Class labels must lie in \[0, 2\]", train=(x, y + 1),
                                    loss="cross_entropy")  # fmt: skip
    assert "from 1 to 3" in message and "subtract 1" in message


def test_labels_of_streamed_data_are_checked_on_the_first_batch() -> None:
    x, y = blobs()
    loader = DataLoader(Subset(TensorDataset(x, y * 2), range(300)), batch_size=32)  # not in memory: streamed
    unchanged_after_error(make_mlp(), tw.DataError, "labels from 0 to 4 in the first samples", train=loader,
                          loss="cross_entropy")  # fmt: skip


# 3. regression shapes: aligned, never broadcast; incompatible shapes explained.
@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_regression_targets_are_aligned_not_broadcast(loss: str) -> None:
    x, y = linear_regression()
    model = nn.Linear(3, 1)
    history, notes = frozen_fit(model, (x, y.reshape(-1)), loss=loss)
    function = {"mse": functional.mse_loss, "l1": functional.l1_loss, "huber": functional.huber_loss}[loss]
    with torch.no_grad():
        expected = function(model(x), y).item()  # not the (N, N) broadcast
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6)
    assert notes == [f"The {loss} targets were reshaped from (N,) to (N, 1) like the outputs."]


def test_flat_outputs_with_column_targets_are_aligned_too() -> None:
    x, y = linear_regression()
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    history, notes = frozen_fit(model, (x, y), loss="mse")
    with torch.no_grad():
        assert history["loss"][0] == pytest.approx(functional.mse_loss(model(x), y.reshape(-1)).item(), rel=1e-6)
    assert "reshaped from (N, 1) to (N,)" in notes[0]


def test_incompatible_regression_shapes_name_both() -> None:
    x, y = linear_regression()
    message = unchanged_after_error(nn.Linear(3, 2), tw.DataError, "shaped exactly like the outputs",
                                    train=(x, y), loss="mse")  # fmt: skip
    assert "(8, 2)" in message and "(8, 1)" in message


# 4. binary cross-entropy
def test_bce_with_outputs_outside_0_1_suggests_logits() -> None:
    x, y = blobs(classes=2)
    message = unchanged_after_error(make_mlp(outputs=1), tw.DataError, "bce_with_logits", train=(x, y.float()),
                                    loss="bce")  # fmt: skip
    assert "outputs from" in message


def test_bce_targets_outside_0_1_name_the_value() -> None:
    x, y = blobs(classes=3)
    message = unchanged_after_error(make_mlp(outputs=1), tw.DataError, r"targets in \[0, 1\]", train=(x, y.float()),
                                    loss="bce_with_logits")  # fmt: skip
    assert "= 2.0" in message


def test_binary_targets_are_aligned_with_column_outputs() -> None:
    x, y = blobs(classes=2)
    model = make_mlp(outputs=1)
    history, notes = frozen_fit(model, (x, y), loss="bce_with_logits", metrics=["accuracy"])
    with torch.no_grad():
        logits = model(x)
    assert history["loss"][0] == pytest.approx(
        functional.binary_cross_entropy_with_logits(logits, y.float().unsqueeze(1)).item(), rel=1e-6
    )
    assert history["accuracy"][0] == pytest.approx(((logits.squeeze(1) > 0).long() == y).float().mean().item())
    assert "reshaped from (N,) to (N, 1)" in notes[0] and "cast from int64 to float32" in notes[0]


# 5. activations that do not fit the loss
def test_softmax_before_cross_entropy_is_warned_about() -> None:
    x, y = blobs()
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    _, notes = frozen_fit(model, (x, y), loss="cross_entropy")
    assert any("ends with Softmax" in note and "raw logits" in note for note in notes)


def test_nll_on_raw_scores_is_warned_about() -> None:
    x, y = blobs()
    _, notes = frozen_fit(make_mlp(), (x, y), loss="nll")
    assert any("nll expects log-probabilities" in note for note in notes)
    _, notes = frozen_fit(nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)), (x, y), loss="nll")
    assert notes == []


# 6. feature dtypes and counts
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_features_are_cast_to_the_models_dtype(dtype: torch.dtype) -> None:
    x, y = blobs()
    x = x.round().to(dtype)
    model = make_mlp()
    loader = DataLoader(Subset(TensorDataset(x, y), range(300)), batch_size=50)  # streamed: repaired per batch
    history, notes = frozen_fit(model, loader, loss="cross_entropy")
    with torch.no_grad():
        expected = functional.cross_entropy(model(x.float()), y).item()
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6)
    assert notes == [
        f"The training data inputs ({str(dtype).removeprefix('torch.')}) were cast to the model's float32."
    ]


def test_a_wrong_feature_count_names_expected_and_received() -> None:
    x, y = blobs(features=6)
    message = unchanged_after_error(make_mlp(inputs=4), tw.DataError, "first layer expects 4 features",
                                    train=(x, y), loss="cross_entropy")  # fmt: skip
    assert "has 6" in message


class Returns(nn.Module):
    """A linear layer whose forward returns ``make(prediction)``."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.layer, self.make = nn.Linear(4, 3), make

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.make(self.layer(inputs))


@pytest.mark.parametrize(
    ("make", "received"),
    [
        (lambda prediction: None, "forward returned None"),
        (lambda prediction: ("a", 1), "forward returned tuple ('a', 1)"),
        (lambda prediction: (), "forward returned tuple ()"),
        (lambda prediction: {"logits": None}, "forward returned dict {'logits': None}"),
        (lambda prediction: 3.5, "forward returned 3.5"),
    ],
)
@pytest.mark.parametrize("loss", ["cross_entropy", None])
def test_outputs_without_any_tensor_are_refused_by_the_check(make: Any, received: str, loss: str | None) -> None:
    # With loss=None, an empty tuple raised IndexError; with a loss, the fix said "name it with
    # output=", which no choice of output can satisfy.
    message = unchanged_after_error(Returns(make), tw.DataError, "forward returned no tensor on a sample of the "
                                    "training data", train=blobs(), loss=loss)  # fmt: skip
    assert received in message and "return the prediction as a tensor" in message
    assert ("without `return`" in message) == (received == "forward returned None")
    with pytest.raises(tw.DataError, match="forward returned no tensor on a sample of the evaluation data"):
        tw.evaluate(Returns(make), blobs(), loss=loss)


# 7. non-finite values
def test_nan_in_in_memory_data_names_the_first_row_and_column() -> None:
    x, y = blobs()
    x[17, 2] = float("nan")
    x[40, 1] = float("inf")
    message = unchanged_after_error(make_mlp(), tw.DataError, "2 non-finite value", train=(x, y), loss="cross_entropy")
    assert "row 17, column 2" in message and "inputs[17, 2] = nan" in message
    x, y = linear_regression()
    y[5, 0] = float("inf")
    unchanged_after_error(nn.Linear(3, 1), tw.DataError, "targets hold 1 non-finite", train=(x, y), loss="mse")


@pytest.mark.parametrize("row", [3, 250])  # inside and after the doctor's 8-sample probe
def test_evaluate_explains_non_finite_results_by_the_first_bad_row(row: int) -> None:
    x, y = blobs()
    model = make_mlp()
    clean = tw.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy"])
    assert all(math.isfinite(value) for value in clean.values())  # finite data: no scan, finite results
    x[row, 1] = float("nan")
    with pytest.raises(tw.DataError, match="evaluation data inputs hold 1 non-finite") as raised:
        tw.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy"])
    assert f"row {row}, column 1" in str(raised.value) and "fix:" in str(raised.value)


def test_nan_in_streamed_data_stops_at_the_first_non_finite_loss() -> None:
    x, y = blobs()
    x[250, 0] = float("nan")
    model = make_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tw.fit(model, DataLoader(Subset(TensorDataset(x, y), range(300)), batch_size=100), loss="cross_entropy", epochs=3,
                         progress=False)  # fmt: skip
    assert history.epochs == 1
    assert any("epoch 1, batch 3" in str(warning.message) for warning in caught)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


# 8. sizes
def test_drop_last_leaving_no_batches_and_batch_size_larger_than_the_data() -> None:
    x, y = blobs(samples=20)
    unchanged_after_error(make_mlp(), tw.DataError, "drop_last=True drops the only",
                          train=DataLoader(TensorDataset(x, y), batch_size=32, drop_last=True), loss="cross_entropy")  # fmt: skip
    history = tw.fit(make_mlp(), (x, y), loss="cross_entropy", batch_size=64, progress=False)
    assert history.epochs == 1  # one batch of 20


def test_a_last_batch_of_one_with_batch_norm_is_left_out() -> None:
    x, y = blobs(samples=65)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    sizes: list[int] = []

    class Sizes(tw.Callback):
        def on_train_batch_start(self, run: tw.Run) -> None:
            assert run.batch is not None
            sizes.append(run.batch.size)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tw.fit(model, (x, y), loss="cross_entropy", batch_size=16, epochs=2, callbacks=[Sizes()], progress=False)
    assert sizes == [16] * 8
    assert any(
        "BatchNorm" in str(warning.message)
        and "last 1 sample(s)" in str(warning.message)
        and "(4 batches per epoch)" in str(warning.message)
        for warning in caught
    )
    sizes.clear()
    tw.fit(model, DataLoader(TensorDataset(x, y), batch_size=16), loss="cross_entropy", callbacks=[Sizes()],
           progress=False)  # fmt: skip
    assert sizes == [16] * 4
    sizes.clear()
    listed = [(x[start : start + 16], y[start : start + 16]) for start in range(0, 65, 16)]  # used as given
    with pytest.warns(tw.TrainwellWarning, match="batch 5 of epoch 1 .* is left out"):
        tw.fit(model, listed, loss="cross_entropy", callbacks=[Sizes()], progress=False)
    assert sizes == [16] * 4


# 9. parameters
def test_optimizer_and_parameter_problems() -> None:
    x, y = blobs()
    unchanged_after_error(make_mlp(), tw.ConfigError, "holds none of the model's", train=(x, y), loss="cross_entropy",
                          optimizer=torch.optim.SGD(make_mlp().parameters(), lr=0.1))  # fmt: skip
    frozen = make_mlp().requires_grad_(False)
    unchanged_after_error(frozen, tw.ConfigError, "no trainable parameters", train=(x, y), loss="cross_entropy")
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight  # the same parameter twice in the model
    history = tw.fit(tied, (x, y), loss="cross_entropy", epochs=2, progress=False)
    assert history.epochs == 2 and tied[2].weight is tied[0].weight


# 10. modes and frozen submodules
def test_frozen_submodules_stay_frozen_and_modes_come_back() -> None:
    model = make_mlp().eval()
    model[0].requires_grad_(False)
    first = model[0].weight.detach().clone()
    tw.fit(model, blobs(), loss="cross_entropy", epochs=2, progress=False)
    assert torch.equal(model[0].weight, first) and not model[0].weight.requires_grad
    assert not model.training


# 11. devices
def test_the_model_is_moved_to_the_requested_device_once() -> None:
    model = make_mlp()
    tw.fit(model, blobs(), loss="cross_entropy", device="cpu", progress=False)
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())


# 12. arguments and metrics that do not fit the task
def test_accuracy_on_a_regression_target_lists_the_valid_metrics() -> None:
    message = unchanged_after_error(nn.Linear(3, 1), tw.DataError, "accuracy needs class targets",
                                    train=linear_regression(), loss="mse", metrics=["accuracy"])  # fmt: skip
    assert "mae" in message and "rmse" in message


def test_the_check_does_not_touch_batch_norm_statistics_or_the_random_stream() -> None:
    x, y = blobs()
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    running = model[1].running_mean.clone()
    batches = to_batches((x, y), batch_size=16, shuffle=True, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    examine(model, resolve_loss_options("cross_entropy"), batches, role="training data", needs_targets=True,
            device=torch.device("cpu"))  # fmt: skip
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(model[1].running_mean, running) and model.training


# Property: any combination either trains or raises a trainwell error, never a raw torch error or a broadcast.
TASKS = st.sampled_from(["cross_entropy", "nll", "bce", "bce_with_logits", "mse", "l1", "huber"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    loss=TASKS,
    outputs=st.sampled_from([1, 2, 3]),
    flat_outputs=st.booleans(),
    target_shape=st.sampled_from(["flat", "column", "wide"]),
    target_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64, torch.uint8]),
    classes=st.sampled_from([2, 3]),
    streamed=st.booleans(),
)
def test_any_combination_trains_or_raises_a_trainwell_error(
    loss: str, outputs: int, flat_outputs: bool, target_shape: str, target_dtype: torch.dtype, classes: int,
    streamed: bool,
) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator)
    labels = torch.randint(0, classes, (40,), generator=generator)
    targets = {"flat": labels, "column": labels.unsqueeze(1), "wide": functional.one_hot(labels, 3)}[target_shape]
    targets = targets.to(target_dtype)
    layers: list[nn.Module] = [nn.Linear(4, outputs)]
    if loss == "bce":
        layers.append(nn.Sigmoid())
    if loss == "nll":
        layers.append(nn.LogSoftmax(dim=1))
    if flat_outputs and outputs == 1:
        layers.append(nn.Flatten(0))
    model = nn.Sequential(*layers)
    data: Any = DataLoader(TensorDataset(x, targets), batch_size=40) if streamed else (x, targets)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            history = tw.fit(model, data, loss=loss, optimizer=frozen, batch_size=40, progress=False)
        except tw.TrainwellError:
            return
    with torch.no_grad():
        outputs = model(x)
    expected = correct_loss(loss, outputs, labels, target_shape)
    assert expected is not None, "trained on a combination that has no sensible reading"
    assert history["loss"][0] == pytest.approx(expected, rel=1e-5)


def correct_loss(loss: str, outputs: torch.Tensor, labels: torch.Tensor, target_shape: str) -> float | None:
    """The loss a careful hand-written loop computes for these outputs and labels (None: no sensible reading)."""
    per_sample = outputs.reshape(len(outputs), -1)
    if loss in ("cross_entropy", "nll"):
        if outputs.dim() != 2 or outputs.shape[1] <= int(labels.max()):
            return None
        function = functional.cross_entropy if loss == "cross_entropy" else functional.nll_loss
        return function(outputs, labels).item()
    functions = {
        "bce": functional.binary_cross_entropy, "bce_with_logits": functional.binary_cross_entropy_with_logits,
        "mse": functional.mse_loss, "l1": functional.l1_loss, "huber": functional.huber_loss,
    }  # fmt: skip
    if target_shape == "wide":  # one column per class: element-wise (multi-label) targets
        return (
            functions[loss](per_sample, functional.one_hot(labels, 3).float()).item()
            if per_sample.shape[1] == 3
            else None
        )
    if per_sample.shape[1] != 1:
        return None
    return functions[loss](per_sample[:, 0], labels.float()).item()
