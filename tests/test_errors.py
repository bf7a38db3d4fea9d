"""Misuse fails before any weight changes, with what / received / fix in the message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trainwell as tw
from trainwell.errors import format_message

from conftest import blobs, linear_regression, make_mlp


def fails_before_training(model: nn.Module, error: type[Exception], *, match: str, **arguments: Any) -> str:
    """Call fit, expect ``error``; assert no parameter changed. Returns the message."""
    before = [parameter.detach().clone() for parameter in model.parameters()]
    arguments.setdefault("progress", False)
    with pytest.raises(error, match=match) as raised:
        tw.fit(model, **arguments)
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old, new)
    message = str(raised.value)
    assert "received:" in message and "fix:" in message
    return message


def test_message_format_has_three_parts() -> None:
    assert format_message("a", "b", "c") == "a\n  received: b\n  fix: c"


@pytest.mark.parametrize(
    ("argument", "value", "match"),
    [
        ("loss", "cross_entropi", "did you mean 'cross_entropy'"),
        ("optimizer", "adamm", "did you mean 'adam'"),
        ("metrics", ["acuracy"], "Unknown metric name 'acuracy'"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("epochs", 2.5, "epochs must be an integer >= 1"),
        ("batch_size", -1, "batch_size must be an integer >= 1"),
        ("val_split", 1.0, r"val_split must be a fraction in \[0, 1\)"),
        ("val_split", -0.1, r"val_split must be a fraction in \[0, 1\)"),
        ("lr", float("nan"), "lr must be a finite number > 0"),
        ("lr", 0, "lr must be a finite number > 0"),
        ("progress", "yes", "Invalid progress"),
        ("device", "gpu", "Unknown device"),
        ("momentun", 0.9, "did you mean 'momentum'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_fix(argument: str, value: Any, match: str) -> None:
    arguments = {"train": blobs(), "loss": "cross_entropy", argument: value}
    message = fails_before_training(make_mlp(), tw.ConfigError, match=match, **arguments)
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in message or str(shown) in message


def test_unknown_names_list_the_known_ones() -> None:
    message = fails_before_training(make_mlp(), tw.ConfigError, match="Unknown loss", train=blobs(), loss="hinge")
    for name in ["mse", "l1", "huber", "cross_entropy", "bce", "bce_with_logits", "nll"]:
        assert name in message
    message = fails_before_training(make_mlp(), tw.ConfigError, match="Unknown optimizer", train=blobs(),
                                    loss="mse", optimizer="lbfgs")  # fmt: skip
    assert "adam, adamw, rmsprop, sgd" in message


def test_class_labels_outside_the_models_outputs() -> None:
    x, y = blobs(classes=3)
    message = fails_before_training(make_mlp(outputs=3), tw.DataError, match=r"Class labels must lie in \[0, 2\]",
                                    train=(x, y + 1), loss="cross_entropy")  # fmt: skip
    assert "labels from 1 to 3" in message and "1-based" in message
    y = y.clone()
    y[-1] = 7  # only the last sample is wrong: the whole in-memory target set is checked
    fails_before_training(make_mlp(outputs=3), tw.DataError, match="labels from 0 to 7 in the data",
                          train=(x, y), loss="cross_entropy")  # fmt: skip


def test_flat_outputs_for_cross_entropy() -> None:
    x, y = blobs()
    fails_before_training(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), tw.DataError, match=r"outputs of shape \(N, C\) with C >= 2",
                          train=(x, y), loss="cross_entropy")  # fmt: skip


def test_bce_with_outputs_that_are_not_probabilities() -> None:
    x, y = blobs(classes=2)
    fails_before_training(make_mlp(outputs=1), tw.DataError, match="bce_with_logits",
                          train=(x, y.float().unsqueeze(1)), loss="bce")  # fmt: skip


def test_data_without_targets_is_rejected_by_fit() -> None:
    x, _ = blobs()
    for data in [x, (x,), x.numpy(), {"input": x}]:
        fails_before_training(make_mlp(), tw.DataError, match="has no targets", train=data, loss="cross_entropy")


@pytest.mark.parametrize(
    "data",
    [
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
    ],
)
def test_empty_data_is_rejected(data: Any) -> None:
    fails_before_training(make_mlp(), tw.DataError, match="empty", train=data, loss="cross_entropy")


def test_mismatched_lengths_and_one_shot_iterators() -> None:
    x, y = blobs()
    fails_before_training(make_mlp(), tw.DataError, match="same number of samples", train=(x, y[:-1]),
                          loss="cross_entropy")  # fmt: skip
    batches = ((x[i : i + 10], y[i : i + 10]) for i in range(0, 300, 10))
    fails_before_training(make_mlp(), tw.ConfigError, match="one-shot iterator", train=batches, loss="cross_entropy")


def test_wrong_feature_count_names_the_shapes() -> None:
    x, y = blobs(features=5)
    message = fails_before_training(make_mlp(inputs=4), tw.DataError, match="first layer expects 4 features",
                                    train=(x, y), loss="cross_entropy")  # fmt: skip
    assert "has 5" in message and "in_features=5" in message


def test_optimizer_over_another_models_parameters() -> None:
    other = torch.optim.SGD(make_mlp().parameters(), lr=0.1)
    fails_before_training(make_mlp(), tw.ConfigError, match="holds none of the model's", train=blobs(),
                          loss="cross_entropy", optimizer=other)  # fmt: skip


def test_lr_with_an_optimizer_instance_is_not_silently_ignored() -> None:
    model = make_mlp()
    fails_before_training(model, tw.ConfigError, match="used as given", train=blobs(), loss="cross_entropy",
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1), lr=0.5)  # fmt: skip


def test_a_loss_that_does_not_reduce_to_a_scalar() -> None:
    x, y = linear_regression()
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda outputs, targets: (outputs - targets) ** 2  # noqa: E731
    fails_before_training(nn.Linear(3, 1), tw.DataError, match="must return a scalar", train=(x, y), loss=loss)


def test_evaluate_and_predict_check_their_arguments_too(mlp: nn.Module) -> None:
    x, y = blobs()
    with pytest.raises(tw.ConfigError, match="A loss is needed: none was given, and the model's outputs carry none"):
        tw.evaluate(mlp, (x, y))
    with pytest.raises(tw.DataError, match="has no targets"):
        tw.evaluate(mlp, x, metrics=["accuracy"])
    with pytest.raises(tw.ConfigError, match=r"model must be a torch\.nn\.Module"):
        tw.predict(nn.Linear, x)  # type: ignore[arg-type]
    with pytest.raises(tw.ConfigError, match="Unsupported kind of data"):
        tw.predict(mlp, "data.csv")


def test_the_meta_device_is_refused_before_the_model_moves() -> None:
    # Moved to "meta", a module keeps shapes and loses its values for good: fit, evaluate and
    # predict refuse the device before touching the model, whose weights stay as they were.
    model = make_mlp()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x, y = blobs()
    calls = (
        lambda: tw.fit(model, (x, y), loss="cross_entropy", device="meta", progress=False),
        lambda: tw.evaluate(model, (x, y), loss="cross_entropy", device="meta"),
        lambda: tw.predict(model, x, device=torch.device("meta")),
    )
    for call in calls:
        with pytest.raises(tw.ConfigError, match=r"meta device holds shapes, not values(.|\n)*device='auto', 'cpu'"):
            call()
        assert all(value.device.type == "cpu" for value in model.state_dict().values())
        assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_single_callback_is_taken_as_a_list_of_one_and_other_objects_are_refused() -> None:
    # Keras and Lightning both take callbacks=EarlyStopping(...) alone; so does fit.
    class Counter(tw.Callback):
        epochs_seen = 0

        def on_epoch_end(self, run: tw.Run) -> None:
            self.epochs_seen += 1

    counter = Counter()
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=2, callbacks=counter, progress=False)
    assert counter.epochs_seen == 2
    fails_before_training(make_mlp(), tw.ConfigError, match="Every entry of callbacks must be a trainwell.Callback",
                          train=blobs(), loss="cross_entropy", callbacks=print)  # fmt: skip


def test_sparse_inputs_and_targets_are_refused_with_the_dense_fix(mlp: nn.Module) -> None:
    # Rows of a sparse tensor cannot be sliced (torch raised NotImplementedError: aten::as_strided).
    x, y = blobs()
    for data, layout, role in [
        ((x.to_sparse(), y), "sparse_coo", "inputs"),
        ((x, y.to_sparse()), "sparse_coo", "targets"),
        (torch.utils.data.TensorDataset(x.to_sparse_csr(), y), "sparse_csr", "inputs"),
    ]:
        message = fails_before_training(mlp, tw.DataError, match=f"The {role} are a {layout} tensor", train=data,
                                        loss="cross_entropy")  # fmt: skip
        assert f"layout {layout}" in message and ".to_dense()" in message
    with pytest.raises(tw.DataError, match="sparse_coo tensor"):
        tw.evaluate(mlp, (x.to_sparse(), y), loss="cross_entropy")
    with pytest.raises(tw.DataError, match="sparse_coo tensor"):
        tw.predict(mlp, x.to_sparse())


def test_load_weights_on_a_truncated_text_or_empty_file_names_the_file(tmp_path: Path) -> None:
    # torch raised RuntimeError (zip central directory), KeyError or IndexError, and EOFError for these.
    whole = tw.save_weights(make_mlp(), tmp_path / "whole.pt").read_bytes()
    for name, content, received in [
        ("truncated.pt", whole[: len(whole) // 2], f"{len(whole) // 2} bytes; "),
        ("notes.pt", b"epoch 3: loss 0.12\n", "19 bytes; "),
        ("empty.pt", b"", "0 bytes (empty)"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        model = make_mlp()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(tw.DataError, match=f"Could not read {path}: it is empty, truncated or damaged") as raised:
            tw.load_weights(model, path)
        assert received in str(raised.value) and "save the weights again" in str(raised.value)
        assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


class OutOfMemoryOnLargeBatches(nn.Module):
    """Raises torch's out-of-memory error on batches of more than 8 samples (the pre-flight probe
    has 8), as a device too small for them would. A real CUDA out-of-memory error cannot happen on
    the CPU machines the tests run on, so this forward raises the error torch raises (the only
    mock in these tests); ``error`` may also be the CPU allocator's RuntimeError."""

    def __init__(self, error: RuntimeError) -> None:
        super().__init__()
        self.layer, self.error = nn.Linear(4, 3), error

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) > 8:
            raise self.error
        return self.layer(inputs)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)"),
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes. Error code 12"
        ),
    ],
)
def test_out_of_memory_says_which_batch_size_to_lower(error: RuntimeError) -> None:
    model = OutOfMemoryOnLargeBatches(error)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x, y = blobs()
    calls = [
        ("fit", 64, lambda: tw.fit(model, (x, y), loss="cross_entropy", batch_size=64, progress=False)),
        ("evaluate", 32, lambda: tw.evaluate(model, (x, y), loss="cross_entropy", batch_size=32)),
        ("evaluate", 300, lambda: tw.evaluate(model, (x, y), loss="cross_entropy")),  # its default: all 300
        ("predict", 32, lambda: tw.predict(model, x, batch_size=32)),
    ]
    for function, size, call in calls:
        with pytest.raises(torch.OutOfMemoryError) as raised:  # what a batch-size search catches still works
            call()
        message = str(raised.value)
        assert isinstance(raised.value, tw.TrainwellError) and raised.value.__cause__ is error
        assert message.startswith(f"A batch of {size} samples did not fit in memory in {function}.")
        assert str(error).split(". ")[0] in message  # torch's reason, as received
        assert f"fix: pass batch_size={size // 2} to {function}" in message
        assert ("grad_accum_steps" in message) == (function == "fit")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_errors_that_are_not_about_memory_pass_through_unchanged() -> None:
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x4 and 5x3)")
    with pytest.raises(RuntimeError) as raised:
        tw.fit(OutOfMemoryOnLargeBatches(error), blobs(), loss="cross_entropy", batch_size=64, progress=False)
    assert raised.value is error
