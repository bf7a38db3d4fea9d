"""fit / evaluate / predict on real training runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import trainwell as tw
from trainwell import models

from conftest import blobs, linear_regression, make_mlp


def test_fit_learns_and_returns_history(mlp: nn.Module, classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    history = tw.fit(
        mlp, classification, loss="cross_entropy", lr=0.1, epochs=5, metrics=["accuracy"], progress=False, seed=0
    )
    assert history.epochs == 5
    assert list(history) == ["loss", "accuracy", "time", "samples_per_second"]
    assert history["loss"][-1] < history["loss"][0] / 3
    assert history["accuracy"][-1] > 0.95 > history["accuracy"][0]
    assert json.loads(json.dumps(history.to_dict())) == history.to_dict()


def test_quick_start_from_the_issue_runs_as_written() -> None:
    x, y = blobs(samples=400, classes=4, features=8)
    model = make_mlp(inputs=8, outputs=4)
    history = tw.fit(
        model, (x, y), loss="cross_entropy", optimizer="sgd", lr=0.01, epochs=10,
        metrics=["accuracy"], val_split=0.1, progress=False,
    )  # fmt: skip
    assert sorted(history) == ["accuracy", "loss", "samples_per_second", "time", "val_accuracy", "val_loss"]
    assert all(len(values) == 10 for values in history.values())


def test_validation_data_and_val_split(mlp: nn.Module, classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = classification
    history = tw.fit(mlp, (x[:250], y[:250]), loss="cross_entropy", lr=0.1, epochs=3, metrics=["accuracy"],
                     val=(x[250:], y[250:]), progress=False, seed=0)  # fmt: skip
    assert history["val_accuracy"][-1] > 0.9
    assert history["val_loss"][-1] == pytest.approx(
        tw.evaluate(mlp, (x[250:], y[250:]), loss="cross_entropy")["loss"], rel=1e-6
    )


def test_val_split_holds_out_a_reproducible_random_subset() -> None:
    x, y = blobs(samples=200)
    seen: list[list[int]] = []

    class RecordValidation(tw.Callback):
        def on_eval_batch_end(self, run: tw.Run) -> None:
            assert run.batch is not None
            seen[-1].extend(run.batch.inputs[:, 0].mul(1000).round().int().tolist())

    for _ in range(2):
        seen.append([])
        tw.fit(make_mlp(), (x, y), loss="cross_entropy", val_split=0.25, epochs=1,
               callbacks=[RecordValidation()], progress=False, seed=3)  # fmt: skip
    assert seen[0] == seen[1]
    assert len(seen[0]) == 50
    assert seen[0] != x[-50:, 0].mul(1000).round().int().tolist()  # not simply the tail


def test_seed_makes_fit_reproducible(classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    def train() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)  # the same initial weights; fit's seed covers dropout and data order
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))
        history = tw.fit(model, classification, loss="cross_entropy", epochs=2, progress=False, seed=7)
        return history["loss"], model[0].weight.detach().clone()

    (loss_a, weight_a), (loss_b, weight_b) = train(), train()
    assert loss_a == loss_b
    assert torch.equal(weight_a, weight_b)


class PairDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def _kinds(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    return {
        "tensors": (x, y),
        "numpy": (x.numpy().astype(np.float64), y.numpy()),
        "list": [x, y],
        "tensor_dataset": TensorDataset(x, y),
        "dataset": PairDataset(x, y),
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True),
        "batches": [(x[start : start + 32], y[start : start + 32]) for start in range(0, len(x), 32)],
    }


@pytest.mark.parametrize("kind", list(_kinds(*blobs(samples=8))))
def test_every_input_kind_trains(kind: str, classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    data = _kinds(*classification)[kind]
    model = make_mlp()
    history = tw.fit(model, data, loss="cross_entropy", lr=0.1, epochs=4, metrics=["accuracy"], progress=False, seed=0)
    assert history["accuracy"][-1] > 0.9
    results = tw.evaluate(model, data, loss="cross_entropy", metrics=["accuracy"])
    assert results["accuracy"] > 0.9
    assert tw.predict(model, data).shape == (300, 3)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.left(left) + self.right(right)


def test_multi_input_models_take_tuples_and_dicts(classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = classification
    extra = torch.randn(len(x), 2)
    for inputs in [(x, extra), {"left": x, "right": extra}]:
        torch.manual_seed(0)
        model = TwoInputs()
        history = tw.fit(model, (inputs, y), loss="cross_entropy", lr=0.1, epochs=3, metrics=["accuracy"],
                         progress=False, seed=0)  # fmt: skip
        assert history["accuracy"][-1] > 0.9
        predictions = tw.predict(model, (inputs,) if isinstance(inputs, tuple) else inputs)
        with torch.no_grad():
            assert torch.allclose(predictions, model(x, extra))


@pytest.mark.parametrize(
    ("loss", "outputs", "make_targets"),
    [
        ("cross_entropy", 3, lambda y: y),
        ("nll", 3, lambda y: y),
        ("bce", 1, lambda y: (y == 0).float().unsqueeze(1)),
        ("bce_with_logits", 1, lambda y: (y == 0).float().unsqueeze(1)),
    ],
)
def test_classification_losses_train(loss: str, outputs: int, make_targets: object) -> None:
    x, y = blobs()
    torch.manual_seed(0)
    head: list[nn.Module] = {"nll": [nn.LogSoftmax(dim=1)], "bce": [nn.Sigmoid()]}.get(loss, [])
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, outputs), *head)
    targets = make_targets(y)  # type: ignore[operator]
    history = tw.fit(model, (x, targets), loss=loss, optimizer="adam", lr=0.01, epochs=5, metrics=["accuracy"],
                     progress=False, seed=0)  # fmt: skip
    assert history["loss"][-1] < history["loss"][0]
    assert history["accuracy"][-1] > 0.9


@pytest.mark.parametrize("loss", ["mse", "l1", "huber", nn.MSELoss(), "custom"])
def test_regression_losses_train(loss: object) -> None:
    x, y = linear_regression()
    model = nn.Linear(3, 1)
    chosen = (lambda outputs, targets: ((outputs - targets) ** 2).mean()) if loss == "custom" else loss
    history = tw.fit(model, (x, y), loss=chosen, optimizer="adam", lr=0.05, epochs=20,  # type: ignore[arg-type]
                     metrics=["mae", "mse", "rmse"], progress=False, seed=0)  # fmt: skip
    assert history["mae"][-1] < 0.2 < history["mae"][0]
    assert history["rmse"][-1] == pytest.approx(history["mse"][-1] ** 0.5)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_named_optimizers_train(name: str, classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    history = tw.fit(make_mlp(), classification, loss="cross_entropy", optimizer=name, epochs=4, progress=False, seed=0)
    assert history["loss"][-1] < history["loss"][0]


def test_optimizer_options_are_forwarded_and_instances_used_as_given(mlp: nn.Module) -> None:
    x, y = blobs()
    seen: list[torch.optim.Optimizer] = []

    class Grab(tw.Callback):
        def on_fit_start(self, run: tw.Run) -> None:
            assert run.optimizer is not None
            seen.append(run.optimizer)

    tw.fit(mlp, (x, y), loss="cross_entropy", optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True,
           callbacks=[Grab()], progress=False)  # fmt: skip
    assert seen[0].defaults["momentum"] == 0.9 and seen[0].defaults["nesterov"] is True
    assert seen[0].defaults["lr"] == 0.05
    mine = torch.optim.Adam(mlp.parameters(), lr=0.003)
    tw.fit(mlp, (x, y), loss="cross_entropy", optimizer=mine, callbacks=[Grab()], progress=False)
    assert seen[1] is mine


class _Optimizers(tw.Callback):
    def __init__(self) -> None:
        self.seen: list[torch.optim.Optimizer] = []

    def on_fit_start(self, run: tw.Run) -> None:
        assert run.optimizer is not None
        self.seen.append(run.optimizer)


def test_named_optimizers_use_torchs_fused_kernel_unless_told_otherwise() -> None:
    x, y = blobs()
    grab = _Optimizers()
    for name in ("sgd", "adam", "adamw"):
        tw.fit(make_mlp(), (x, y), loss="cross_entropy", optimizer=name, callbacks=[grab], progress=False)
    tw.fit(make_mlp(), (x, y), loss="cross_entropy", optimizer="adam", foreach=True, callbacks=[grab], progress=False)
    tw.fit(make_mlp(), (x, y), loss="cross_entropy", optimizer="rmsprop", callbacks=[grab], progress=False)
    fused = [optimizer.defaults.get("fused") for optimizer in grab.seen]
    assert fused == [True, True, True, None, None]  # the user's foreach wins; RMSprop has no fused kernel
    assert grab.seen[3].defaults["foreach"] is True


def test_fused_sgd_trains_exactly_like_torchs_default_sgd() -> None:
    x, y = blobs()
    model, reference = make_mlp(), make_mlp()
    reference.load_state_dict(model.state_dict())
    tw.fit(model, (x, y), loss="cross_entropy", optimizer="sgd", lr=0.1, momentum=0.9, batch_size=len(x), epochs=5,
           progress=False)  # fmt: skip
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):  # one full batch per epoch: the order does not matter
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    for trained, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)


def test_sparse_gradients_keep_the_unfused_optimizer() -> None:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    x, y = torch.randint(0, 10, (64, 2)), torch.randint(0, 2, (64,))
    grab = _Optimizers()
    history = tw.fit(model, (x, y), loss="cross_entropy", optimizer="sgd", lr=0.1, epochs=2, callbacks=[grab],
                     progress=False)  # fmt: skip
    assert grab.seen[0].defaults.get("fused") is None and history.epochs == 2


def test_evaluate_averages_over_samples(mlp: nn.Module, classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = classification
    results = tw.evaluate(mlp, (x, y), loss="cross_entropy", metrics=["accuracy"], batch_size=7)
    with torch.no_grad():
        outputs = mlp(x)
    assert results["loss"] == pytest.approx(nn.functional.cross_entropy(outputs, y).item(), rel=1e-6)
    assert results["accuracy"] == pytest.approx((outputs.argmax(1) == y).float().mean().item())


def test_predict_keeps_input_order_and_returns_cpu_tensors(mlp: nn.Module) -> None:
    x = torch.randn(1000, 4)
    predictions = tw.predict(mlp, x, batch_size=64)
    with torch.no_grad():
        expected = mlp(x)
    assert predictions.device.type == "cpu"
    assert torch.allclose(predictions, expected, atol=1e-6)
    assert torch.allclose(tw.predict(mlp, (x, torch.zeros(1000))), expected, atol=1e-6)
    assert torch.allclose(tw.predict(mlp, x.numpy()), expected, atol=1e-6)


class BatchSizes(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return self.model(x)


def test_evaluate_and_predict_choose_their_batch_from_the_model() -> None:
    # A small MLP is little work per sample: the default batch grows to 4096 (after a probe of 2
    # samples, and evaluate's pre-flight check of 8);
    # the results equal those of a small explicit batch (tolerance 1e-6: float32 sums in another order).
    x, y = blobs(samples=10_000, features=20)
    light = BatchSizes(make_mlp(inputs=20))
    logs = tw.evaluate(light, (x, y), loss="cross_entropy", metrics=["accuracy"])
    assert light.sizes == [2, 8, 4096, 4096, 10_000 - 2 * 4096]
    assert logs == pytest.approx(
        tw.evaluate(light, (x, y), loss="cross_entropy", metrics=["accuracy"], batch_size=64), rel=1e-6
    )
    light.sizes.clear()
    torch.testing.assert_close(tw.predict(light, x), tw.predict(light, x, batch_size=64), rtol=1e-6, atol=1e-6)
    assert light.sizes[:4] == [2, 4096, 4096, 10_000 - 2 * 4096]
    # A convolution over 3x64x64 images is heavy: the low end, 256 (the former fixed default).
    images = torch.randn(600, 3, 64, 64)
    heavy = BatchSizes(nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)))
    tw.predict(heavy, images)
    assert heavy.sizes == [2, 256, 256, 88]
    # A DataLoader keeps its own batches; an explicit batch_size is used as given.
    light.sizes.clear()
    tw.predict(light, DataLoader(TensorDataset(x[:100]), batch_size=30))
    tw.predict(light, x[:100], batch_size=50)
    assert light.sizes == [30, 30, 30, 10, 50, 50]


def test_the_default_inference_batch_fits_in_memory() -> None:
    # 3x512x512 images through two 64-channel convolutions produce ~200 MB per sample: 256 of them
    # would take 50 GB. The chosen batch keeps what one batch produces within 2 GiB on the CPU.
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    size = models.inference_batch_size(model, torch.randn(2, 3, 512, 512), 2, torch.device("cpu"))
    per_sample = 3 * 64 * 512 * 512 * 4
    assert size == 8 and size * per_sample <= models.INFERENCE_CPU_BYTES < 2 * size * per_sample
    # Work it cannot count (weights used outside any leaf module, as nn.MultiheadAttention's
    # projections are) or a model it cannot hook (TorchScript) gets the former default, 256; the
    # scripted model still predicts.
    attention = nn.TransformerEncoderLayer(16, nhead=2, batch_first=True)
    assert models.inference_batch_size(attention, torch.randn(2, 5, 16), 2, torch.device("cpu")) == 256
    scripted = torch.jit.script(nn.Linear(4, 3))
    assert models.inference_batch_size(scripted, torch.randn(2, 4), 2, torch.device("cpu")) == 256
    x = torch.randn(300, 4)
    torch.testing.assert_close(tw.predict(scripted, x), scripted(x).detach(), rtol=0, atol=0)
    # The probe changes nothing: the same random stream, modes and buffers after it.
    norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
    inputs = torch.randn(2, 4)
    state, buffers = torch.random.get_rng_state(), [b.clone() for b in norm.buffers()]
    models.inference_batch_size(norm, inputs, 2, torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state()) and norm.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, norm.buffers(), strict=True))


def test_evaluation_restores_the_models_modes_exactly(classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a user who froze batch-norm statistics
    tw.fit(model, classification, loss="cross_entropy", val_split=0.2, epochs=1, progress=False)
    assert [module.training for module in model] == [True, False, True, True]
    model.eval()
    tw.fit(model, classification, loss="cross_entropy", epochs=1, progress=False)
    assert not any(module.training for module in model.modules())


def test_model_given_in_eval_mode_is_trained_in_train_mode(classification: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = make_mlp().eval()
    modes: list[bool] = []

    class Spy(tw.Callback):
        def on_train_batch_start(self, run: tw.Run) -> None:
            modes.append(run.model.training)

    tw.fit(model, classification, loss="cross_entropy", epochs=1, callbacks=[Spy()], progress=False)
    assert modes and all(modes)
    assert not model.training
