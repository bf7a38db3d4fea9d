"""The seams between batch geometry, accounting, checkpoints and options: each test is a case that
gave a wrong result, a crash after the weights changed, or a silent loss of work before."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset, get_worker_info

import trainwell as tw
from trainwell.batches import BatchPlan, Layout
from trainwell.callbacks import Monitor

from conftest import blobs, make_mlp


def test_the_plan_counts_what_it_yields() -> None:
    for samples in range(1, 70):
        for world in (1, 2, 3):
            for min_batch in (1, 2):
                for drop_last in (False, True):
                    for rank in range(world):
                        layout = Layout(rank, world, lockstep=True, min_batch=min_batch)
                        plan = BatchPlan(samples, 8, drop_last, layout)
                        steps = list(plan.steps())
                        assert len(steps) == plan.num_batches
                        assert all(step.size == 0 or step.size >= min_batch for step in steps)
                        # each step's global size is the same on every rank and covers what the ranks take
                        assert (
                            sum(step.global_size for step in steps)
                            + plan.left_out
                            + (samples % (8 * world) if drop_last else 0)
                            == samples
                        )
                        assert list(plan.steps(skip=1)) == steps[1:]
                    # evaluation: every sample exactly once over the ranks, none padded
                    seen = [
                        position
                        for rank in range(world)
                        for step in BatchPlan(samples, 8, layout=Layout(rank, world, lockstep=False)).steps()
                        for position in range(samples)[step.positions]
                    ]
                    assert sorted(seen) == list(range(samples))


def test_on_fit_start_of_a_resumed_run_sees_the_restored_run(tmp_path: Path) -> None:
    x, y = blobs(samples=64)
    seen: list[tuple[int, int, torch.Tensor]] = []

    class Look(tw.Callback):
        def on_fit_start(self, run: tw.Run) -> None:
            seen.append((run.start_epoch, run.global_step, run.module[0].weight.detach().clone()))

    model = make_mlp()
    tw.fit(model, (x, y), loss="cross_entropy", epochs=2, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    trained = model[0].weight.detach().clone()
    fresh = make_mlp()
    tw.fit(fresh, (x, y), loss="cross_entropy", epochs=3, batch_size=16, checkpoint_dir=tmp_path, resume=True,
           callbacks=[Look()], progress=False)  # fmt: skip
    start_epoch, global_step, weights = seen[0]
    assert (start_epoch, global_step) == (2, 8)
    assert torch.equal(weights, trained)


def test_the_custom_step_recipe_logs_its_loss_and_speed() -> None:
    x, y = blobs()

    def my_step(run: tw.Run, batch: Any) -> torch.Tensor:
        outputs = run.model(batch.inputs)
        loss = tw.compute_loss(run, outputs, batch) + 1e-4 * sum(p.square().sum() for p in run.model.parameters())
        loss.backward()
        tw.optimizer_step(run)
        return loss

    history = tw.fit(make_mlp(), (x, y), loss="cross_entropy", lr=0.1, epochs=3, step=my_step, progress=False)
    assert all(math.isfinite(value) for value in history["loss"])
    assert history["loss"][-1] < history["loss"][0]
    outputs_step = tw.fit(make_mlp(), (x, y), loss="cross_entropy", lr=0.1, metrics=["accuracy"], progress=False,
                          step=lambda run, batch: tw.train_step(run, batch))  # fmt: skip
    assert set(outputs_step) == {"loss", "accuracy", "time", "samples_per_second"}


class GAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))


def test_a_gan_trains_with_named_losses_without_targets_or_a_loss() -> None:
    gan = GAN()
    real = torch.randn(256, 2) * 0.5 + 2.0
    optimizers = {
        "d": torch.optim.Adam(gan.discriminator.parameters(), lr=2e-3),
        "g": torch.optim.Adam(gan.generator.parameters(), lr=2e-3),
    }

    def gan_step(run: tw.Run, batch: Any) -> dict[str, torch.Tensor]:
        noise = torch.randn(batch.size, 2)
        fake = gan.generator(noise)
        ones, zeros = torch.ones(batch.size, 1), torch.zeros(batch.size, 1)
        loss_d = functional.binary_cross_entropy_with_logits(
            gan.discriminator(batch.inputs), ones
        ) + functional.binary_cross_entropy_with_logits(gan.discriminator(fake.detach()), zeros)
        optimizers["d"].zero_grad()
        loss_d.backward()
        optimizers["d"].step()
        loss_g = functional.binary_cross_entropy_with_logits(gan.discriminator(fake), ones)
        optimizers["g"].zero_grad()
        loss_g.backward()
        optimizers["g"].step()
        return {"loss_d": loss_d, "loss_g": loss_g}

    stopper = tw.EarlyStopping(monitor="loss_g", patience=100, restore_best_weights=False)
    with torch.no_grad():
        before = gan.generator(torch.randn(512, 2)).mean().item()
    history = tw.fit(gan, real, optimizer=optimizers["g"], step=gan_step, epochs=15, batch_size=32,
                     callbacks=[stopper], progress=False)  # fmt: skip
    assert list(history) == ["loss_d", "loss_g", "time", "samples_per_second"] and history.epochs == 15
    assert all(math.isfinite(value) for value in history["loss_d"] + history["loss_g"])
    with torch.no_grad():  # the generator moved towards the real data's mean (2, 2)
        assert gan.generator(torch.randn(512, 2)).mean().item() > before + 0.5


def test_a_reused_early_stopping_does_not_put_back_the_previous_runs_weights() -> None:
    x, y = blobs()
    stopper = tw.EarlyStopping(monitor="loss", patience=50)
    model = make_mlp()
    tw.fit(model, (x, y), loss="cross_entropy", lr=0.5, epochs=3, callbacks=[stopper], progress=False, seed=0)
    second = make_mlp(seed=1)
    history = tw.fit(second, (x, y), loss="cross_entropy", lr=1e-4, epochs=2, callbacks=[stopper], progress=False)
    # the second run's best epoch is its own (its loss is much higher than the first run's best)
    assert stopper.best_epoch == min(range(2), key=lambda epoch: history["loss"][epoch])
    assert stopper.tracker.best == min(history["loss"])
    assert not torch.equal(second[0].weight, model[0].weight)


@pytest.mark.parametrize("key", ["val_f1_score", "f1_macro", "val_auroc", "binary_auroc", "iou", "dice", "recall"])
def test_auto_mode_maximises_scores(key: str) -> None:
    assert Monitor(key).mode == "max"
    assert Monitor(key.replace("f1", "loss").replace("auroc", "mae")).mode == "min" or "f1" not in key


def test_a_checkpoint_with_auto_mode_keeps_the_epoch_with_the_best_f1(tmp_path: Path) -> None:
    scores = [0.2, 0.9, 0.5]

    class F1(tw.Callback):
        adds_logs = ("val_f1_score",)

        def on_epoch_start(self, run: tw.Run) -> None:
            run.extra_logs["val_f1_score"] = scores[run.epoch]

    checkpoint = tw.ModelCheckpoint(tmp_path / "best-{epoch}.pt", monitor="val_f1_score", save_best_only=True)
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, callbacks=[F1(), checkpoint], progress=False)
    assert checkpoint.best_path == tmp_path / "best-2.pt"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best-1.pt", "best-2.pt"]


def test_a_metric_that_cannot_be_used_fails_before_any_weight_changes() -> None:
    model = make_mlp()
    before = {key: value.clone() for key, value in model.state_dict().items()}

    def per_class(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).float()  # one value per sample, not a scalar

    with pytest.raises(tw.ConfigError, match="per_class"):
        tw.fit(model, blobs(), loss="cross_entropy", metrics=[per_class], progress=False)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())

    def as_float(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float((outputs.argmax(1) == targets).float().mean())

    history = tw.fit(model, blobs(), loss="cross_entropy", metrics=[as_float], batch_size=300, progress=False)
    assert 0 <= history["as_float"][0] <= 1


def test_predict_reads_a_list_of_input_batches_and_a_generator() -> None:
    batches = [torch.arange(0.0, 4.0), torch.arange(4.0, 8.0)]
    assert tw.predict(nn.Identity(), batches).tolist() == list(range(8))
    three = [torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3)]
    assert tw.predict(nn.Identity(), three).shape == (6, 3)
    generated = (torch.full((2, 1), float(index)) for index in range(3))
    assert tw.predict(nn.Identity(), generated).flatten().tolist() == [0, 0, 1, 1, 2, 2]
    x, y = blobs(samples=30)
    results = tw.evaluate(make_mlp(), ((x[i : i + 10], y[i : i + 10]) for i in range(0, 30, 10)), loss="cross_entropy")
    assert results["loss"] == pytest.approx(tw.evaluate(make_mlp(), (x, y), loss="cross_entropy")["loss"], rel=1e-6)


def test_reduce_on_plateau_lowers_the_rate_after_two_epochs_without_improvement() -> None:
    scores = [1.0, 2.0, 3.0, 0.5, 0.6, 0.7, 0.8]

    class Score(tw.Callback):
        def on_epoch_start(self, run: tw.Run) -> None:
            run.extra_logs["loss_seen"] = 0.0

        def on_epoch_end(self, run: tw.Run) -> None:
            run.logs["loss"] = scores[run.epoch]  # what the scheduler reads (it runs after this)

    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", lr=1.0, epochs=7, scheduler="reduce_on_plateau",
                     callbacks=[Score()], progress=False)  # fmt: skip
    # best 1.0 at epoch 1; epochs 2 and 3 do not improve: lowered for epoch 4
    assert history["lr"] == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01])


def test_a_checkpoint_without_a_monitor_saves_every_epoch(tmp_path: Path) -> None:
    checkpoint = tw.ModelCheckpoint(tmp_path / "epoch{epoch}.pt", monitor=None)
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, callbacks=[checkpoint], progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["epoch1.pt", "epoch2.pt", "epoch3.pt"]
    with pytest.raises(tw.ConfigError, match="save_best_only needs"):
        tw.ModelCheckpoint(tmp_path / "x.pt", monitor=None, save_best_only=True)


def test_invalid_options_touch_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with pytest.raises(tw.ConfigError, match="fp16 mixed precision needs a GPU"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", precision="fp16", device="cpu", checkpoint_dir=folder)
    with pytest.raises(tw.ConfigError, match=r"scheduler"):
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", scheduler="cosin", checkpoint_dir=folder)
    assert not folder.exists()


def test_lbfgs_is_refused_before_training_and_works_in_a_custom_step() -> None:
    model = make_mlp()
    before = model[0].weight.detach().clone()
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.5)
    with pytest.raises(tw.ConfigError, match="closure"):
        tw.fit(model, blobs(), loss="cross_entropy", optimizer=lbfgs, progress=False)
    assert torch.equal(model[0].weight, before)

    def closure_step(run: tw.Run, batch: Any) -> torch.Tensor:
        def closure() -> torch.Tensor:
            lbfgs.zero_grad()
            loss = tw.compute_loss(run, run.model(batch.inputs), batch)
            loss.backward()
            return loss

        return lbfgs.step(closure)  # type: ignore[no-any-return]

    history = tw.fit(model, blobs(), loss="cross_entropy", optimizer=lbfgs, step=closure_step, epochs=2,
                     batch_size=300, progress=False)  # fmt: skip
    assert history["loss"][1] < history["loss"][0]


def test_the_pre_flight_check_leaves_buffers_a_forward_updates() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.linear(inputs)

    model = Counting()
    x, y = blobs(samples=64)
    tw.fit(model, (x, y), loss="cross_entropy", batch_size=16, progress=False)
    assert int(model.calls) == 4  # four training batches; the doctor's probe left no trace


class Noisy(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Records the worker processes that load it; draws random noise per sample."""

    def __init__(self, folder: Path) -> None:
        self.x, self.y = blobs(samples=96)
        self.folder = folder

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if get_worker_info() is not None:
            (self.folder / str(os.getpid())).touch()
        return self.x[index] + 0.01 * torch.randn(4), self.y[index]


def test_persistent_workers_are_kept_across_epochs(tmp_path: Path) -> None:
    for persistent, expected in ((True, 2), (False, 6)):
        folder = tmp_path / str(persistent)
        folder.mkdir()
        loader = DataLoader(Noisy(folder), batch_size=16, shuffle=True, num_workers=2, persistent_workers=persistent)
        tw.fit(make_mlp(), loader, loss="cross_entropy", epochs=3, seed=0, progress=False)
        assert len(list(folder.iterdir())) == expected  # worker processes started in 3 epochs


def test_a_loss_module_is_in_eval_mode_during_validation() -> None:
    modes: dict[str, list[bool]] = {"train": [], "eval": []}

    class Recording(nn.CrossEntropyLoss):
        phase = "check"  # the pre-flight check's calls are not recorded

        def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            modes.setdefault(self.phase, []).append(self.training)
            return super().forward(outputs, targets)

    class Phase(tw.Callback):
        def on_train_batch_start(self, run: tw.Run) -> None:
            loss.phase = "train"

        def on_eval_start(self, run: tw.Run) -> None:
            loss.phase = "eval"

    x, y = blobs(samples=64)
    loss = Recording()
    tw.fit(make_mlp(), (x, y), loss=loss, batch_size=64, epochs=2, val=(x, y), callbacks=[Phase()], progress=False)
    assert modes["train"] == [True, True] and modes["eval"] == [False, False]
    assert loss.training  # given back in its own mode


def test_a_one_cycle_scheduler_object_steps_per_batch_and_reaches_its_peak() -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = blobs(samples=320)
    epochs, steps = 4, 10
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, steps_per_epoch=steps, epochs=epochs)
    rates: list[float] = []

    class Rates(tw.Callback):
        def on_before_optimizer_step(self, run: tw.Run) -> None:
            rates.append(optimizer.param_groups[0]["lr"])

    tw.fit(model, (x, y), loss="cross_entropy", optimizer=optimizer, scheduler=one_cycle, epochs=epochs,
           batch_size=32, callbacks=[Rates()], progress=False)  # fmt: skip
    assert len(rates) == epochs * steps and max(rates) == pytest.approx(1e-2, rel=0.02)
    assert rates[-1] < 1e-4


def test_plans_the_model_cannot_train_on_are_refused_before_training(tmp_path: Path) -> None:
    norm = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x, y = blobs(samples=40)
    with pytest.raises(tw.DataError, match="batches of one sample"):
        tw.fit(norm, (x, y), loss="cross_entropy", batch_size=1, progress=False)
    with pytest.raises(tw.DataError, match="no batch to train on"):
        tw.fit(norm, (x[:1], y[:1]), loss="cross_entropy", progress=False)


def test_custom_step_options_that_cannot_work_are_refused(tmp_path: Path) -> None:
    def step(run: tw.Run, batch: Any) -> torch.Tensor:
        return torch.ones(1)  # a (1,)-shaped loss is read as one number

    assert tw.fit(make_mlp(), blobs(), step=step, progress=False)["loss"] == [1.0]
    with pytest.raises(tw.ConfigError, match="cannot accumulate"):
        tw.fit(make_mlp(), blobs(), step=step, grad_accum_steps=2, progress=False)
    folder = tmp_path / "untouched"
    for options in ({"scheduler": 42}, {"resume": 1}, {"callbacks": [tw.EarlyStopping(monitor="val_loss")]}):
        with pytest.raises(tw.ConfigError):
            tw.fit(make_mlp(), blobs(), loss="cross_entropy", checkpoint_dir=folder, progress=False, **options)
    assert not folder.exists()
    with pytest.raises(tw.DataError, match="no batches"):
        tw.predict(nn.Identity(), iter([]))


class Random(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(1), torch.tensor(index)


def test_worker_seeds_differ_between_ranks_and_repeat_on_resume() -> None:
    from trainwell.batches import DatasetBatches

    def draws(rank: int, skip: int = 0) -> list[float]:
        batches = DatasetBatches(Random(), batch_size=4, shuffle=True, seed=3, device=torch.device("cpu"),
                                 loader_options={"num_workers": 1})  # fmt: skip
        batches.lay_out(Layout(rank, 2))
        return [value for batch in batches.for_epoch(0, skip=skip) for value in batch.inputs.flatten().tolist()]

    first, second = draws(0), draws(1)
    assert len(set(first) | set(second)) == 16  # no two samples share their random draw
    assert draws(1, skip=1) == second[4:]  # a resumed epoch draws the same augmentation


class Stream(torch.utils.data.IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        self.x, self.y = blobs(samples=100)

    def __iter__(self) -> Any:
        return zip(self.x, self.y, strict=True)


def test_an_iterable_dataset_yields_samples_that_are_batched() -> None:
    sizes: list[int] = []

    class Sizes(tw.Callback):
        def on_train_batch_start(self, run: tw.Run) -> None:
            assert run.batch is not None
            sizes.append(run.batch.size)

    history = tw.fit(make_mlp(), Stream(), loss="cross_entropy", lr=0.5, batch_size=32, epochs=3, callbacks=[Sizes()],
                     metrics=["accuracy"], progress=False)  # fmt: skip
    assert sizes[:4] == [32, 32, 32, 4] and history["accuracy"][-1] > 0.9
    assert tw.predict(make_mlp(), Stream()).shape == (100, 3)
