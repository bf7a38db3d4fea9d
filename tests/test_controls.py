"""Training controls in real fits: early stopping, schedules, logs, NaN stop, precision,
accumulation, clipping, class and sample weights."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

import trainwell as tw
from trainwell.callbacks import HOOKS

from conftest import blobs, linear_regression, make_mlp


class Scripted(tw.Callback):
    """Logs a scripted ``score`` per epoch and snapshots the weights at each epoch end."""

    adds_logs = ("score",)

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_epoch_start(self, run: tw.Run) -> None:
        run.extra_logs["score"] = self.scores[run.epoch]

    def on_epoch_end(self, run: tw.Run) -> None:
        self.snapshots.append({key: value.clone() for key, value in run.module.state_dict().items()})


def weights_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, snapshot[key]) for key, value in model.state_dict().items())


def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best_weights() -> None:
    model = make_mlp()
    script = Scripted([5.0, 3.0, 4.0, 3.5, 1.0, 1.0])
    stopper = tw.EarlyStopping(monitor="score", patience=2)
    history = tw.fit(model, blobs(), loss="cross_entropy", epochs=6, callbacks=[script, stopper], progress=False)
    assert history.epochs == 4 and history["score"] == [5.0, 3.0, 4.0, 3.5]
    assert stopper.stopped_epoch == 3 and stopper.best_epoch == 1
    assert weights_equal(model, script.snapshots[1])
    assert not weights_equal(model, script.snapshots[3])


def test_early_stopping_restores_the_best_weights_when_epochs_run_out() -> None:
    model = make_mlp()
    x, y = blobs()
    stopper = tw.EarlyStopping(monitor="val_loss", patience=10)
    snapshots = Scripted([0.0] * 6)
    history = tw.fit(model, (x, y), loss="cross_entropy", lr=2.0, epochs=6, val_split=0.3, seed=1,
                     callbacks=[snapshots, stopper], progress=False)  # fmt: skip
    best = min(range(6), key=lambda epoch: history["val_loss"][epoch])
    assert stopper.stopped_epoch is None and stopper.best_epoch == best
    assert weights_equal(model, snapshots.snapshots[best])


def test_hook_order_with_validation_and_early_stopping() -> None:
    events: list[str] = []

    class Recorder(tw.Callback):
        pass

    for hook in HOOKS:
        setattr(Recorder, hook, lambda self, run, name=hook: events.append(f"{name}:{run.epoch}"))
    x, y = blobs(samples=6)
    script = Scripted([1.0, 2.0, 3.0])
    tw.fit(make_mlp(), (x[:4], y[:4]), loss="cross_entropy", batch_size=4, epochs=3, val=(x[4:], y[4:]),
           callbacks=[script, tw.EarlyStopping(monitor="score", patience=1), Recorder()], progress=False)  # fmt: skip
    epoch = [
        "on_epoch_start", "on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end",
        "on_eval_start", "on_eval_batch_end", "on_eval_end", "on_epoch_end",
    ]  # fmt: skip
    expected = ["on_fit_start:0"] + [f"{name}:{number}" for number in (0, 1) for name in epoch] + ["on_fit_end:1"]
    assert events == expected  # stopped after epoch 2 (score 2.0 did not improve on 1.0)


def test_a_monitor_that_will_never_exist_is_an_error_before_training() -> None:
    model = make_mlp()
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(tw.ConfigError, match="there is no validation data") as raised:
        tw.fit(model, blobs(), loss="cross_entropy", metrics=["accuracy"], callbacks=[tw.EarlyStopping()],
               progress=False)  # fmt: skip
    assert "monitor one of: loss, accuracy" in str(raised.value)
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    with pytest.raises(tw.ConfigError, match="'val_acc'"):
        tw.fit(model, blobs(), loss="cross_entropy", val_split=0.2, scheduler=tw.LRScheduler(
            lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), monitor="val_acc"),
            progress=False)  # fmt: skip


def test_model_checkpoint_files_load_into_a_fresh_model_with_identical_predictions(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = blobs()
    every = tw.ModelCheckpoint(tmp_path / "all" / "epoch{epoch:02d}-{val_loss:.3f}.pt")
    best = tw.ModelCheckpoint(tmp_path / "best.pt", monitor="val_accuracy", save_best_only=True)
    history = tw.fit(model, (x, y), loss="cross_entropy", lr=0.05, epochs=3, metrics=["accuracy"], val_split=0.2,
                     callbacks=[every, best], progress=False, seed=0)  # fmt: skip
    names = sorted(path.name for path in (tmp_path / "all").iterdir())
    assert names == [f"epoch{epoch + 1:02d}-{history['val_loss'][epoch]:.3f}.pt" for epoch in range(3)]
    fresh = make_mlp(seed=99)
    tw.load_weights(fresh, tmp_path / "all" / names[-1])
    assert torch.equal(tw.predict(fresh, x), tw.predict(model, x))
    assert best.best_path == tmp_path / "best.pt"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_save_best_only_writes_only_on_improvement(tmp_path: Path) -> None:
    script = Scripted([3.0, 1.0, 2.0, 0.5])
    writes: list[int] = []

    class Spy(tw.Callback):
        def on_epoch_end(self, run: tw.Run) -> None:
            path = tmp_path / "best.pt"
            writes.append(path.stat().st_mtime_ns if path.exists() else 0)

    best = tw.ModelCheckpoint(tmp_path / "best.pt", monitor="score", save_best_only=True)
    model = make_mlp()
    tw.fit(model, blobs(), loss="cross_entropy", epochs=4, callbacks=[script, best, Spy()], progress=False)
    assert writes[0] != writes[1] and writes[1] == writes[2] and writes[2] != writes[3]
    fresh = make_mlp(seed=5)
    tw.load_weights(fresh, tmp_path / "best.pt")
    assert weights_equal(fresh, script.snapshots[3])


def _expected_lrs(make: Any, epochs: int, steps_per_epoch: int, per_step: bool, base_lr: float = 0.1) -> list[float]:
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    scheduler = make(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps_per_epoch if per_step else 1):
            optimizer.step()
            scheduler.step()
    return lrs


@pytest.mark.parametrize("name", ["step", "cosine", "onecycle"])
def test_named_schedules_produce_torchs_learning_rate_sequence(name: str) -> None:
    epochs, steps = 6, 10  # 300 samples, batch_size 30
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=0.1, batch_size=30, epochs=epochs, scheduler=name,
                     progress=False)  # fmt: skip
    schedulers = torch.optim.lr_scheduler
    total = epochs * steps
    warmup = max(1, round(0.05 * total))
    makers = {
        "step": (lambda optimizer: schedulers.StepLR(optimizer, step_size=2, gamma=0.1), False),
        "onecycle": (lambda optimizer: schedulers.OneCycleLR(optimizer, max_lr=[0.1], total_steps=total), True),
        "cosine": (lambda optimizer: schedulers.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup
                   else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))), True),
    }  # fmt: skip
    make, per_step = makers[name]
    assert history["lr"] == pytest.approx(_expected_lrs(make, epochs, steps, per_step), rel=1e-12)


def test_reduce_on_plateau_watches_the_named_value() -> None:
    script = Scripted([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    schedule = tw.LRScheduler(
        lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1),
        monitor="score",
    )
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=0.1, epochs=6, callbacks=[script, schedule],
                     progress=False)  # fmt: skip
    assert history["lr"] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025])


def test_csv_logger_rows_equal_the_history_and_append(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, metrics=["accuracy"], val_split=0.2,
                     callbacks=[tw.CSVLogger(path)], progress=False)  # fmt: skip
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert list(rows[0])[-2:] == ["time", "samples_per_second"]  # the epoch's timing columns, last
    for key in history:
        assert [float(row[key]) for row in rows] == history[key]
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=2, metrics=["accuracy"], val_split=0.2,
           callbacks=[tw.CSVLogger(path, append=True)], progress=False)  # fmt: skip
    with path.open() as file:
        assert len(list(csv.DictReader(file))) == 5


def test_tensorboard_event_files_hold_the_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the TensorBoard callback needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, metrics=["accuracy"], val_split=0.2,
                     batch_size=30, callbacks=[tw.TensorBoard(tmp_path, every_n_steps=4)], progress=False)  # fmt: skip
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "accuracy", "val_loss", "val_accuracy", "time",
                                             "samples_per_second", "batch/loss"}  # fmt: skip
    for key in history:
        scalars = events.Scalars(key)
        assert [event.step for event in scalars] == [1, 2, 3]
        assert [event.value for event in scalars] == pytest.approx(history[key], rel=1e-6)
    assert [event.step for event in events.Scalars("batch/loss")] == [4, 8, 12, 16, 20, 24]
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, val_split=0.2, batch_size=30, grad_accum_steps=2,
           callbacks=[tw.TensorBoard(tmp_path / "accumulated", every_n_steps=4)], progress=False)  # fmt: skip
    accumulated = EventAccumulator(str(tmp_path / "accumulated"))
    accumulated.Reload()
    assert [event.step for event in accumulated.Scalars("batch/loss")] == [4, 8, 12]  # once per optimizer step


def test_terminate_on_nan_keeps_the_last_finite_weights() -> None:
    calls = 0

    def fragile(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = functional.cross_entropy(outputs, targets)
        return loss * float("nan") if calls == 8 else loss  # call 1 is the pre-flight check

    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(tw.Callback):
        def on_train_batch_end(self, run: tw.Run) -> None:
            snapshots.append({key: value.clone() for key, value in run.module.state_dict().items()})

    model = make_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tw.fit(model, blobs(), loss=fragile, batch_size=100, epochs=5, callbacks=[Snapshot()],
                         progress=False)  # fmt: skip
    # batches of 100: the 7th training batch (epoch 3, batch 1) gives NaN
    assert len(snapshots) == 7 and weights_equal(model, snapshots[5])
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    assert history.epochs == 3 and math.isnan(history["loss"][2])
    assert any("epoch 3, batch 1" in str(warning.message) for warning in caught)


def test_bf16_trains_on_the_cpu() -> None:
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=0.1, epochs=4, metrics=["accuracy"],
                     precision="bf16", progress=False, seed=0)  # fmt: skip
    assert history["accuracy"][-1] > 0.9
    with pytest.raises(tw.ConfigError, match="fp16 mixed precision needs a GPU"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", precision="fp16", device="cpu", progress=False)
    with pytest.raises(tw.ConfigError, match="Unknown precision"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", precision="fp8", progress=False)  # type: ignore[arg-type]


def test_compiled_models_save_plain_keys(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = blobs()
    history = tw.fit(model, (x, y), loss="cross_entropy", lr=0.1, epochs=2, compile=True, progress=False, seed=0,
                     callbacks=[tw.ModelCheckpoint(tmp_path / "weights.pt", monitor="loss")])  # fmt: skip
    assert history["loss"][-1] < history["loss"][0]
    saved = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(saved) == set(make_mlp().state_dict())
    fresh = make_mlp(seed=3)
    tw.load_weights(fresh, tmp_path / "weights.pt")
    assert torch.allclose(tw.predict(fresh, x), tw.predict(model, x))
    compiled = torch.compile(make_mlp(seed=4))
    tw.load_weights(fresh, tw.save_weights(compiled, tmp_path / "compiled.pt"))  # _orig_mod. prefixes removed


@pytest.mark.parametrize(("samples", "batch_size", "steps"), [(64, 8, 4), (40, 8, 3)])
def test_gradient_accumulation_equals_one_big_batch(samples: int, batch_size: int, steps: int) -> None:
    x, y = linear_regression(samples=samples)
    small, big = nn.Linear(3, 1), nn.Linear(3, 1)
    big.load_state_dict(small.state_dict())
    tw.fit(small, (x, y), loss="mse", lr=0.1, batch_size=batch_size, grad_accum_steps=steps, shuffle=False,
           epochs=2, progress=False)  # fmt: skip
    tw.fit(big, (x, y), loss="mse", lr=0.1, batch_size=batch_size * steps, shuffle=False, epochs=2, progress=False)
    for accumulated, reference in zip(small.parameters(), big.parameters(), strict=True):
        assert torch.allclose(accumulated, reference, atol=1e-6)


def test_accumulated_gradients_stay_at_the_scale_of_a_batch_mean() -> None:
    # fp16 (CUDA only, so not run here) keeps gradients in a narrow range: each batch of a window
    # contributes its mean loss times its share of the window, never the loss times the batch size.
    x, y = linear_regression(samples=32)
    model = nn.Linear(3, 1)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    contributions: list[torch.Tensor] = []
    model.weight.register_hook(lambda gradient: contributions.append(gradient.clone()))
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    tw.fit(model, (x, y), loss="mse", optimizer=frozen, batch_size=8, grad_accum_steps=2, shuffle=False,
           progress=False)  # fmt: skip
    reference = nn.Linear(3, 1)
    reference.load_state_dict(start)
    for index, contribution in enumerate(contributions):
        rows = slice(8 * index, 8 * index + 8)
        reference.zero_grad()
        (functional.mse_loss(reference(x[rows]), y[rows]) / 2).backward()
        assert reference.weight.grad is not None
        assert torch.allclose(contribution, reference.weight.grad, atol=1e-6)  # a batch mean over the window's 2


def test_gradient_clipping_bounds_the_norm_and_values() -> None:
    norms: list[float] = []
    largest: list[float] = []

    class Measure(tw.Callback):
        def on_before_optimizer_step(self, run: tw.Run) -> None:
            gradients = [parameter.grad for parameter in run.parameters if parameter.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in gradients])).item())
            largest.append(max(g.abs().max().item() for g in gradients))

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=0.5, clip_grad_norm=0.01, callbacks=[Measure()],
           progress=False)  # fmt: skip
    assert max(norms) <= 0.01 + 1e-6
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=0.5, clip_grad_value=0.001, callbacks=[Measure()],
           progress=False)  # fmt: skip
    assert max(largest[len(norms) // 2 :]) <= 0.001 + 1e-9
    with pytest.raises(tw.ConfigError, match="clip_grad_norm must be a number > 0"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", clip_grad_norm=-1, progress=False)


def _frozen_loss(model: nn.Module, data: tuple[Any, ...], **arguments: Any) -> float:
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    history = tw.fit(model, data, optimizer=frozen, batch_size=len(data[0]), progress=False, **arguments)
    return history["loss"][0]


def test_class_weights_change_the_loss_exactly_as_torch_does() -> None:
    x, y = blobs()
    model = make_mlp()
    weights = torch.tensor([1.0, 3.0, 0.5])
    with torch.no_grad():
        outputs = model(x)
    expected = functional.cross_entropy(outputs, y, weight=weights).item()
    assert _frozen_loss(model, (x, y), loss="cross_entropy", class_weight={0: 1.0, 1: 3.0, 2: 0.5}) == pytest.approx(
        expected, rel=1e-6
    )
    assert _frozen_loss(model, (x, y), loss="cross_entropy", class_weight=[1.0, 3.0, 0.5]) == pytest.approx(
        expected, rel=1e-6
    )
    binary = make_mlp(outputs=1)
    targets = (y == 0).float().unsqueeze(1)
    with torch.no_grad():
        logits = binary(x)
    expected = functional.binary_cross_entropy_with_logits(logits, targets, weight=1 + 4 * targets).item()
    assert _frozen_loss(binary, (x, targets), loss="bce_with_logits", class_weight={0: 1.0, 1: 5.0}) == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(tw.ConfigError, match="class_weight applies to classification losses"):
        tw.fit(nn.Linear(3, 1), linear_regression(), loss="mse", class_weight={0: 1.0}, progress=False)


def test_sample_weights_come_as_a_third_data_element() -> None:
    x, y = blobs()
    weights = torch.rand(len(y))
    model = make_mlp()
    with torch.no_grad():
        expected = (functional.cross_entropy(model(x), y, reduction="none") * weights).mean().item()
    assert _frozen_loss(model, (x, y, weights), loss="cross_entropy") == pytest.approx(expected, rel=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, weights), batch_size=300)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    history = tw.fit(model, loader, loss="cross_entropy", optimizer=frozen, progress=False)
    assert history["loss"][0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(tw.ConfigError, match="Sample weights need a named loss"):
        tw.fit(model, (x, y, weights), loss=nn.CrossEntropyLoss(), progress=False)


def test_lambda_callback_and_custom_steps() -> None:
    seen: list[int] = []
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=2, progress=False,
                     callbacks=[tw.LambdaCallback(on_epoch_end=lambda run: seen.append(run.epoch))])  # fmt: skip
    assert seen == [0, 1] and history.epochs == 2
    with pytest.raises(tw.ConfigError, match="'on_epoch_ending' is not one"):
        tw.LambdaCallback(on_epoch_ending=print)
    steps: list[int] = []

    def my_step(run: tw.Run, batch: Any) -> None:
        steps.append(batch.size)
        tw.train_step(run, batch)

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", batch_size=128, step=my_step, progress=False)
    assert steps == [128, 128, 44]


def test_compile_modes_train_like_the_eager_model() -> None:
    # compile="reduce-overhead" captures CUDA graphs on a GPU; on the CPU torch compiles the same
    # model without them, which is what can run here: the weights after two epochs equal eager
    # training on the same seed. Tolerance 1e-5: the compiled kernels fuse and reorder float32 sums.
    x, y = blobs()
    models = {}
    for mode in (False, "reduce-overhead"):
        models[mode] = make_mlp()
        tw.fit(models[mode], (x, y), loss="cross_entropy", lr=0.1, epochs=2, batch_size=16, compile=mode,
               progress=False, seed=0)  # fmt: skip
    for eager, compiled in zip(models[False].parameters(), models["reduce-overhead"].parameters(), strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    with pytest.raises(tw.ConfigError, match=r"Invalid compile\.(.|\n)*'reduce-overhead'"):
        tw.fit(make_mlp(), (x, y), loss="cross_entropy", compile="fast", progress=False)
