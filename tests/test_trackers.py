"""fit(log_to=...): real MLflow (one sqlite store per session) and W&B (offline) runs read back
through their own clients and files; a dead server, a failing store, a SIGKILL and resume,
torchrun's rank 0, and the refusals. No tracking library is mocked."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import trainwell as tw
from test_loop import SyncsPerStep
from trainwell import loggers
from trainwell.history import TIME_KEYS
from trainwell.loggers import STEP_KEY
from trainwell.trackers import Session

from conftest import blobs, make_mlp, without_time

TESTS = Path(__file__).parent
FIT = {"loss": "cross_entropy", "epochs": 3, "metrics": ["accuracy"], "val_split": 0.2, "seed": 0, "progress": False}


def trainwell_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(warning.message) for warning in caught if issubclass(warning.category, tw.TrainwellWarning)]


# --- MLflow ---


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the session (creating its tables takes seconds); each test uses an
    experiment of its own. Artifacts of new experiments go under the folder of the first client."""
    pytest.importorskip("mlflow", reason="the MLflow tracker needs the optional mlflow package")
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    before = Path.cwd()
    os.chdir(folder)  # MLflow resolves its default artifact folder, ./mlruns, once per store
    try:
        MlflowClient(tracking_uri=uri).search_experiments()
    finally:
        os.chdir(before)
    return uri


def experiment_runs(uri: str, name: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, name
    return list(client.search_runs([experiment.experiment_id]))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)
    return sorted((metric.step, metric.value) for metric in history)


def artifact(uri: str, run_id: str, name: str, into: Path) -> Path:
    from mlflow import MlflowClient

    return Path(MlflowClient(tracking_uri=uri).download_artifacts(run_id, name, str(into)))


def test_mlflow_by_name_logs_resolved_options_epochs_and_artifacts(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"by-name-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)  # where MLflow's users put it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.chdir(tmp_path)
    model = make_mlp()
    history = tw.fit(model, blobs(), log_to="mlflow", **FIT)  # type: ignore[arg-type]
    (run,) = experiment_runs(mlflow_uri, name)
    assert run.info.status == "FINISHED"
    params = run.data.params
    expected = {"lr": "0.01", "optimizer": "SGD", "device": "cpu", "seed": "0", "batch_size": "32", "epochs": "3",
                "loss": "cross_entropy", "metrics": "accuracy", "precision": "fp32", "grad_accum_steps": "1",
                "scheduler": "None", "model": "Sequential", "parameters": "131", "train_samples": "240",
                "val_samples": "60", "optimizer_momentum": "0", "shuffle": "True", "val_split": "0.2",
                "class_weight": "False", "loss_weights": "None", "checkpoint_every": "None",
                "terminate_on_nan": "True"}  # fmt: skip
    assert {key: params.get(key) for key in expected} == expected  # the optimizer's own lr, not a hidden None
    assert not Path("runs").exists()  # a tracker name writes no local folder of trainwell's
    for key, values in history.items():
        assert metric_history(mlflow_uri, run.info.run_id, key) == list(enumerate(values, start=1)), key
    logged = artifact(mlflow_uri, run.info.run_id, "history.csv", tmp_path / "artifacts")
    assert logged.read_text() == history_csv(history, tmp_path)
    weights = artifact(mlflow_uri, run.info.run_id, "weights.pt", tmp_path / "artifacts")
    restored = make_mlp(seed=1)
    tw.load_weights(restored, weights)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_the_logged_weights_are_a_model_checkpoints_best_else_those_early_stopping_restored(
    mlflow_uri: str, tmp_path: Path
) -> None:
    worst = {"monitor": "val_loss", "mode": "max"}  # the loss falls: the "best" is epoch 1, not the last
    for name, callbacks in (("early", [tw.EarlyStopping(patience=9, **worst)]),  # type: ignore[arg-type]
                            ("checkpoint", [tw.ModelCheckpoint(tmp_path / "best.pt", save_best_only=True, **worst)]),  # type: ignore[arg-type]
                            ("both", [tw.EarlyStopping(patience=9, **worst),  # type: ignore[arg-type]
                                      tw.ModelCheckpoint(tmp_path / "e{epoch}.pt", **worst)])):  # type: ignore[arg-type]  # fmt: skip
        experiment = f"weights-{name}-{uuid.uuid4().hex[:8]}"
        model = make_mlp()
        tw.fit(model, blobs(), callbacks=callbacks, log_to=tw.MLflowLogger(experiment=experiment, tracking_uri=mlflow_uri),
               **FIT)  # type: ignore[arg-type]  # fmt: skip
        (run,) = experiment_runs(mlflow_uri, experiment)
        logged = artifact(mlflow_uri, run.info.run_id, "weights.pt", tmp_path / name)
        if name == "checkpoint":  # the checkpoint's best file, not the last epoch's weights fit returns
            assert logged.read_bytes() == (tmp_path / "best.pt").read_bytes()
            continue
        expected = (tmp_path / "e1.pt").read_bytes() if name == "both" else None
        if expected is not None:
            assert logged.read_bytes() == expected
        restored = make_mlp(seed=1)
        tw.load_weights(restored, logged)
        for key, value in model.state_dict().items():  # EarlyStopping restored epoch 1's before the tracker's end
            assert torch.equal(restored.state_dict()[key], value), key


def test_run_config_holds_plain_values_not_the_optimizers_live_tensors() -> None:
    seen: list[dict[str, Any]] = []

    class Config(tw.Callback):
        def on_fit_start(self, run: tw.Run) -> None:
            seen.append(run.config)

    model = make_mlp()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99))
    )
    tw.fit(model, blobs(), optimizer=optimizer, callbacks=[Config()], class_weight=[1.0, 2.0, 1.0],  # type: ignore[arg-type]
           **(FIT | {"epochs": 1}))  # fmt: skip
    (config,) = seen

    def plain(value: Any) -> bool:
        if isinstance(value, (tuple, list)):
            return all(plain(item) for item in value)
        if isinstance(value, dict):
            return all(isinstance(key, str) and plain(item) for key, item in value.items())
        return value is None or isinstance(value, (bool, int, float, str))

    assert [key for key, value in config.items() if not plain(value)] == []
    assert config["lr"] == pytest.approx(0.01) and config["optimizer_betas"] == (
        pytest.approx(0.9),
        pytest.approx(0.99),
    )
    assert config["class_weight"] is True and config["terminate_on_nan"] is True


def history_csv(history: tw.History, folder: Path) -> str:
    return history.to_csv(folder / "expected.csv").read_text()


def test_mlflow_logger_object_sets_names_tags_and_step_losses(mlflow_uri: str) -> None:
    name = f"object-{uuid.uuid4().hex[:8]}"
    logger = tw.MLflowLogger(experiment=name, run_name="baseline", tracking_uri=mlflow_uri, tags={"team": "vision"},
                             every_n_steps=4, log_weights=False)  # fmt: skip
    losses: dict[int, float] = {}

    class Losses(tw.Callback):  # the reference: each 4th step's loss, read with .item() right there
        def on_train_batch_end(self, run: tw.Run) -> None:
            if run.window_batches == 0 and run.global_step % 4 == 0:
                assert run.loss is not None
                losses[run.global_step] = run.loss.item()

    tw.fit(make_mlp(), blobs(), batch_size=30, callbacks=[Losses()], log_to=[logger], **FIT)  # type: ignore[arg-type]
    (run,) = experiment_runs(mlflow_uri, name)
    assert run.info.run_name == "baseline" and run.data.tags["team"] == "vision"
    steps = metric_history(mlflow_uri, run.info.run_id, STEP_KEY)
    assert [step for step, _ in steps] == [4, 8, 12, 16, 20, 24]  # 8 steps per epoch, every 4th
    assert steps == [(step, pytest.approx(value, rel=1e-6)) for step, value in sorted(losses.items())]
    from mlflow import MlflowClient

    assert [item.path for item in MlflowClient(tracking_uri=mlflow_uri).list_artifacts(run.info.run_id)] == [
        "history.csv"
    ]


def test_step_losses_are_kept_on_the_device_not_read_per_step(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loggers, "READ_EVERY_SECONDS", 1e9)  # a slow machine must not reach the timed read
    watch = SyncsPerStep()  # after the loggers' on_train_batch_end: it counts theirs too
    loggers_ = [
        tw.MLflowLogger(experiment=f"sync-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_uri, every_n_steps=1),
        tw.TensorBoard(tmp_path, every_n_steps=1),
    ]
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=2, batch_size=16, callbacks=[*loggers_, watch],
           progress=False, terminate_on_nan=False)  # fmt: skip
    assert watch.per_step == [0] * 38  # read together at each epoch's end (or every few seconds), never per step


def test_an_experiment_id_of_mlflows_current_store_is_not_used_in_another(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    chosen = client.create_experiment(f"by-id-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", chosen)
    for current, expected in ((mlflow_uri, chosen), (f"sqlite:///{tmp_path / 'other.db'}", "0")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", current)  # MLflow's current store, and the id's
        name = f"run-{uuid.uuid4().hex[:8]}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tw.fit(make_mlp(), blobs(), log_to=tw.MLflowLogger(run_name=name, tracking_uri=mlflow_uri), **FIT)  # type: ignore[arg-type]
        assert trainwell_warnings(caught) == []
        (run,) = client.search_runs([expected], filter_string=f"attributes.run_name = '{name}'")
        assert run.info.status == "FINISHED"
    assert not (tmp_path / "other.db").exists()


def test_an_experiment_created_by_a_parallel_run_at_the_same_moment_is_used(mlflow_uri: str) -> None:
    from mlflow import MlflowClient

    name = f"race-{uuid.uuid4().hex[:8]}"

    class Racing(MlflowClient):  # a real client; another sweep's run creates the experiment just after our look-up
        def get_experiment_by_name(self, name: str) -> Any:
            found = super().get_experiment_by_name(name)
            if found is None and not getattr(self, "raced", False):
                self.raced = True
                MlflowClient(tracking_uri=mlflow_uri).create_experiment(name)
            return found

    logger = tw.MLflowLogger(experiment=name, tracking_uri=mlflow_uri)
    found = MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name
    session = Session(config={}, history=tw.History())
    assert logger._experiment(session, Racing(tracking_uri=mlflow_uri)) == found(name).experiment_id  # type: ignore[union-attr]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once the socket is closed


def test_a_dead_mlflow_server_neither_stops_nor_stalls_training(
    closed_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="the MLflow tracker needs the optional mlflow package")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # where the run's history.csv and weights.pt wait
    started = time.monotonic()
    expected = tw.fit(make_mlp(), blobs(), **FIT)  # type: ignore[arg-type]
    alone = time.monotonic() - started
    # MLflow's client retries a refused connection with backoff for minutes; the logger's calls
    # wait on their own thread, and fit's end waits for them at most timeout seconds.
    logger = tw.MLflowLogger(tracking_uri=f"http://127.0.0.1:{closed_port}", every_n_steps=1, timeout=2)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tw.fit(make_mlp(), blobs(), log_to=logger, **FIT)  # type: ignore[arg-type]
    assert time.monotonic() - started < alone + 2 + 10
    assert without_time(history) == without_time(expected)
    (message,) = trainwell_warnings(caught)
    assert message.startswith("MLflow did not finish within 2 s")
    assert list(temporary.glob("trainwell-*")) == []  # removed by fit, though the worker never got to them


def test_a_late_thread_of_a_timed_out_fit_writes_into_its_own_run_not_the_next_fits(mlflow_uri: str) -> None:
    import threading

    name = f"late-{uuid.uuid4().hex[:8]}"
    gate, late = threading.Event(), []

    class Held(tw.MLflowLogger):  # the real logger, whose first fit's run is created late
        def open(self, session: Session) -> None:
            if not late:
                late.append(threading.current_thread())
                gate.wait(60)
            super().open(session)

    class Release(tw.Callback):  # during the second fit, the first fit's thread goes on
        def on_epoch_end(self, run: tw.Run) -> None:
            if run.epoch == 0 and late:
                gate.set()
                late[0].join(60)

    logger = Held(experiment=name, tracking_uri=mlflow_uri, timeout=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tw.fit(make_mlp(), blobs(), log_to=logger, **FIT)  # type: ignore[arg-type]
    assert trainwell_warnings(caught)[0].startswith("MLflow did not finish within 0.5 s")
    history = tw.fit(make_mlp(seed=2), blobs(), callbacks=[Release(), logger], **FIT)  # type: ignore[arg-type]
    assert not late[0].is_alive()
    runs = {run.info.status: run for run in experiment_runs(mlflow_uri, name)}
    second = runs["FINISHED"]  # the first fit's run never finished: its files were gone
    assert metric_history(mlflow_uri, second.info.run_id, "loss") == list(enumerate(history["loss"], start=1))


def test_a_store_that_fails_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="the MLflow tracker needs the optional mlflow package")
    (tmp_path / "file").write_text("not a folder")
    expected = tw.fit(make_mlp(), blobs(), **FIT)  # type: ignore[arg-type]
    logger = tw.MLflowLogger(tracking_uri=f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}", every_n_steps=1)
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = tw.fit(make_mlp(), blobs(), log_to=logger, **FIT)  # type: ignore[arg-type]
    assert time.monotonic() - started < 20
    assert without_time(history) == without_time(expected)
    (message,) = trainwell_warnings(caught)
    assert message.startswith("MLflow logging failed and is off for the rest of this run; training goes on.")


KILLED = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[4])
    import trainwell as tw
    from mlflow import MlflowClient
    from conftest import blobs, make_mlp

    uri, experiment, directory = sys.argv[1], sys.argv[2], sys.argv[3]

    class Kill(tw.Callback):  # after the logger logged epoch 3, before the checkpoint holds it
        def on_epoch_end(self, run):
            if run.epoch + 1 == 3 and not os.path.exists(os.path.join(directory, "killed")):
                client = MlflowClient(tracking_uri=uri)
                found = client.get_experiment_by_name(experiment)
                for _ in range(400):
                    runs = client.search_runs([found.experiment_id]) if found else []
                    if runs and 3 in [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]:
                        break
                    time.sleep(0.05)
                    found = found or client.get_experiment_by_name(experiment)
                open(os.path.join(directory, "killed"), "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    logger = tw.MLflowLogger(experiment=experiment, tracking_uri=uri, every_n_steps=3)
    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=4, metrics=["accuracy"], val_split=0.2, seed=0,
           progress=False, callbacks=[logger, Kill()], checkpoint_dir=directory, resume="auto")
    """
)


@pytest.mark.slow
def test_a_run_killed_and_resumed_is_one_mlflow_run_equal_to_an_uninterrupted_one(
    mlflow_uri: str, tmp_path: Path
) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    name = f"killed-{uuid.uuid4().hex[:8]}"
    arguments = [sys.executable, str(script), mlflow_uri, name, str(tmp_path / "ck"), str(TESTS)]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    killed = subprocess.run(arguments, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = subprocess.run(arguments, capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr

    golden_name = f"golden-{uuid.uuid4().hex[:8]}"
    golden = tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=4, metrics=["accuracy"], val_split=0.2, seed=0,
                    progress=False, log_to=tw.MLflowLogger(experiment=golden_name, tracking_uri=mlflow_uri,
                                                           every_n_steps=3))  # fmt: skip
    (run,) = experiment_runs(mlflow_uri, name)  # one tracked run, continued
    (golden_run,) = experiment_runs(mlflow_uri, golden_name)
    assert run.info.status == "FINISHED"
    for key, values in golden.items():
        logged = metric_history(mlflow_uri, run.info.run_id, key)
        assert [step for step, _ in logged] == [1, 2, 3, 4], key  # epoch 3, trained twice, logged once
        if key not in TIME_KEYS:
            assert [value for _, value in logged] == values, key
    steps = metric_history(mlflow_uri, run.info.run_id, STEP_KEY)
    assert steps == metric_history(mlflow_uri, golden_run.info.run_id, STEP_KEY)  # each step once, the same losses
    assert [step for step, _ in steps] == list(range(3, 8 * 4 + 1, 3))


# --- W&B (offline) ---


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wandb = pytest.importorskip("wandb", reason="the W&B tracker needs the optional wandb package")
    folder = tmp_path / "wandb-files"
    folder.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
                       "WANDB_PROJECT": "trainwell-tests"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    yield folder
    wandb.teardown()  # W&B reads its environment once per process: the next test's is read afresh


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline run's ``run-<id>.wandb``: W&B's file header (7 bytes), then
    LevelDB-log blocks of 32 KiB (each chunk: checksum, length, type), each record a protobuf.
    A file cut short (a chunk past its end, a record left open) fails here, not as missing values."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position < len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            assert not data[position : position - position % 32768 + 32768].strip(b"\0"), (path, position)
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        assert position + 7 + length <= len(data), f"{path} is cut short at byte {position}"
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
    assert position == len(data) and not pending, f"{path} ends inside a record"


def wandb_runs(folder: Path) -> list[dict[str, Any]]:
    """Each offline run folder, oldest first: its id, config, epochs and step losses (as logged, in
    order: an epoch logged twice shows twice), artifacts, exit code."""
    import wandb

    wandb.teardown()  # W&B's service writes the run file after finish() returns: wait for it to end
    runs = []
    for run_folder in sorted((folder / "wandb").glob("offline-run-*")):
        found: dict[str, Any] = {"folder": run_folder, "epochs": [], "values": {}, "steps": [], "losses": {},
                                 "artifacts": [], "exit": None}  # fmt: skip
        for record in wandb_records(next(run_folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["id"] = record.run.run_id
                found["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                values = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                if "epoch" in values:
                    found["epochs"].append(values["epoch"])
                    found["values"][values["epoch"]] = values
                if "global_step" in values:
                    found["steps"].append(values["global_step"])
                    found["losses"][values["global_step"]] = values[STEP_KEY]
            elif kind == "artifact":
                found["artifacts"].append((record.artifact.name, record.artifact.type))
            elif kind == "exit":
                found["exit"] = record.exit.exit_code
        assert found["exit"] is not None, f"{run_folder} has no exit record"
        runs.append(found)
    return runs


def test_wandb_by_name_logs_the_config_epochs_and_artifacts(wandb_offline: Path, tmp_path: Path) -> None:
    history = tw.fit(make_mlp(), blobs(), log_to="wandb", **FIT)  # type: ignore[arg-type]
    (run,) = wandb_runs(wandb_offline)
    config = run["config"]
    assert {key: config[key] for key in ("lr", "seed", "device", "batch_size", "model", "train_samples")} == {
        "lr": 0.01, "seed": 0, "device": "cpu", "batch_size": 32, "model": "Sequential", "train_samples": 240,
    }  # fmt: skip
    assert run["epochs"] == [1, 2, 3]
    for key, values in history.items():
        assert [run["values"][epoch][key] for epoch in (1, 2, 3)] == values, key
    assert run["artifacts"] == [(f"model-{run['id']}", "model")] and run["exit"] == 0
    assert (run["folder"] / "files" / "history.csv").read_text() == history_csv(history, tmp_path)


@pytest.mark.parametrize("logged", [False, True], ids=["crash-before-logging", "crash-after-logging"])
def test_wandb_resume_continues_the_same_run_logging_each_epoch_once(wandb_offline: Path, logged: bool) -> None:
    crash = {"at": 3}

    class Crash(tw.Callback):
        def on_epoch_end(self, run: tw.Run) -> None:
            if run.epoch + 1 == crash["at"]:
                raise RuntimeError("the machine went away")

    def fit(**options: Any) -> tw.History:
        logger = tw.WandbLogger(name="resumed", every_n_steps=4)
        placed = {"callbacks": [logger, Crash()]} if logged else {"callbacks": [Crash()], "log_to": logger}
        return tw.fit(make_mlp(), blobs(), checkpoint_dir="ck", **placed, **(FIT | {"epochs": 4} | options))  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="went away"):
        fit()
    crash["at"] = 0
    history = fit(resume=True)
    first, resumed = wandb_runs(wandb_offline)
    assert first["id"] == resumed["id"] and (first["exit"], resumed["exit"]) == (1, 0)
    # The checkpoint of epoch 2 waited for W&B to take epochs 1 and 2, so the resumed run does not
    # log them again. Epoch 3 died before its checkpoint: when W&B had logged it (the logger before
    # Crash), offline W&B cannot tell, and it shows in both files, with the same values.
    assert first["epochs"] == ([1, 2, 3] if logged else [1, 2])
    assert resumed["epochs"] == [3, 4]
    epochs = first["values"] | resumed["values"]
    for key, values in without_time(history).items():
        assert [epochs[epoch][key] for epoch in (1, 2, 3, 4)] == values, key
    # The steps of epoch 3 were logged as it trained (and its last ones at fit's end), in either case.
    assert first["steps"] == [4, 8, 12, 16, 20, 24]
    assert resumed["steps"] == [20, 24, 28, 32]


def test_wandb_logs_beside_the_users_own_run_and_leaves_it_open(wandb_offline: Path) -> None:
    import wandb

    mine = wandb.init(config={"mine": 1})
    tw.fit(make_mlp(), blobs(), log_to="wandb", **FIT)  # type: ignore[arg-type]
    assert wandb.run is mine  # still the user's run, still open
    mine.log({"after": 1.0})
    mine.finish()
    runs = {run["id"]: run for run in wandb_runs(wandb_offline)}
    assert len(runs) == 2 and runs[mine.id]["epochs"] == [] and runs[mine.id]["config"]["mine"] == 1
    (ours,) = [run for key, run in runs.items() if key != mine.id]
    assert ours["epochs"] == [1, 2, 3] and ours["exit"] == 0


# --- the files trackers ---


@pytest.mark.parametrize("placed", ["log_to names", "objects before the crash"])
def test_csv_and_tensorboard_resume_continue_their_folders_each_epoch_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placed: str
) -> None:
    pytest.importorskip("tensorboard", reason="the TensorBoard logger needs the optional tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    crash = {"at": 3}

    class Crash(tw.Callback):  # epoch 3 ends, then the run dies before its checkpoint
        def on_epoch_end(self, run: tw.Run) -> None:
            if run.epoch + 1 == crash["at"]:
                raise RuntimeError("stopped")

    def fit(**options: Any) -> tw.History:
        if placed == "log_to names":  # log_to's loggers come after Crash: epoch 3 is never logged
            where = {"callbacks": [Crash()], "log_to": ["csv", "tensorboard"]}
        else:  # before Crash: epoch 3 is logged, and the resumed run must drop it (truncate, purge)
            where = {"callbacks": [tw.CSVLogger(), tw.TensorBoard(), Crash()]}
        return tw.fit(make_mlp(), blobs(), checkpoint_dir="ck", **where, **(FIT | {"epochs": 4} | options))  # type: ignore[arg-type]

    with pytest.raises(RuntimeError):
        fit()
    (csv_file,) = Path("runs").glob("*/history.csv")
    assert len(csv_file.read_text().splitlines()) == 1 + (2 if placed == "log_to names" else 3)
    folders = set(Path("runs").iterdir())
    crash["at"] = 0
    history = fit(resume=True)
    assert set(Path("runs").iterdir()) == folders  # the resumed run continued the folders of its checkpoint
    rows = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    for key, values in without_time(history).items():
        assert [float(row[key]) for row in rows] == values, key
    (board,) = {path.parent for path in Path("runs").glob("*/events.*")}
    events = EventAccumulator(str(board))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]  # each once (purge_step)
    assert [event.value for event in events.Scalars("loss")] == pytest.approx(history["loss"], rel=1e-6)


def test_runs_of_the_same_second_get_folders_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard", reason="the TensorBoard logger needs the optional tensorboard package")
    monkeypatch.chdir(tmp_path)
    csv_logger, board = tw.CSVLogger(), tw.TensorBoard()  # objects used for two fits each: a folder per fit
    fits = [(["csv", "tensorboard"], 3), (["csv", "tensorboard"], 1), (csv_logger, 2), (csv_logger, 1), (board, 1),
            (board, 2)]  # fmt: skip
    for log_to, epochs in fits:
        before = set(Path("runs").glob("*"))
        history = tw.fit(make_mlp(), blobs(), log_to=log_to, **(FIT | {"epochs": epochs}))  # type: ignore[arg-type]
        (folder,) = set(Path("runs").glob("*")) - before  # a new folder, even within the same second
        files = sorted(path.name.split(".")[0] for path in folder.iterdir())
        expected = ["events"] if log_to is board else ["history"] if log_to is csv_logger else ["events", "history"]
        assert files == expected
        if "history" in files:  # intact: the rows of this fit only
            rows = list(csv.DictReader(io.StringIO((folder / "history.csv").read_text())))
            assert [float(row["loss"]) for row in rows] == history["loss"]
    assert len(list(Path("runs").iterdir())) == len(fits)


# --- refusals ---


LOGGER = tw.CSVLogger("never.csv")  # in callbacks= of each refusal below
TWICE = tw.CSVLogger("never.csv")


@pytest.mark.parametrize(
    ("log_to", "message"),
    [
        ("mlfow", r"Unknown log_to name 'mlfow'.*did you mean 'mlflow'"),
        ("all", r"Unknown log_to name 'all'.*use one of: csv, mlflow, tensorboard, wandb"),
        (3, r"log_to must be a tracker name, a logger object, or a list of them"),
        ([tw.EarlyStopping()], r"log_to takes tracker names or logger objects.*other callbacks go in callbacks="),
        (["csv", "csv"], r"log_to names 'csv' twice"),
        ([TWICE, TWICE], r"The same CSVLogger object is given twice.*it is in log_to twice"),
        ([LOGGER, "tensorboard"], r"The same CSVLogger object is given twice.*it is in log_to and in callbacks"),
    ],
)
def test_wrong_log_to_values_are_refused_before_any_work(
    log_to: Any, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tw.ConfigError, match=f"(?s){message}"):
        tw.fit(make_mlp(), blobs(), checkpoint_dir="ck", log_to=log_to, callbacks=[LOGGER], **FIT)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # no checkpoint folder, no runs folder


MISSING = textwrap.dedent(
    """
    import sys
    sys.modules["mlflow"] = None  # as if it were not installed: importing it raises ImportError
    sys.modules["wandb"] = None
    sys.path.insert(0, sys.argv[1])
    import trainwell as tw
    from conftest import blobs, make_mlp

    for call in (lambda: tw.fit(make_mlp(), blobs(), loss="cross_entropy", log_to="mlflow", progress=False),
                 lambda: tw.fit(make_mlp(), blobs(), loss="cross_entropy", log_to=["csv", "wandb"], progress=False),
                 lambda: tw.MLflowLogger(), lambda: tw.WandbLogger()):
        try:
            call()
        except tw.ConfigError as error:
            print(str(error).splitlines()[-1])
    """
)


def test_a_missing_library_names_the_extra_to_install(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", MISSING, str(TESTS)], capture_output=True, text=True, timeout=120,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "  fix: pip install 'trainwell[mlflow]' (or pip install mlflow).",
        "  fix: pip install 'trainwell[wandb]' (or pip install wandb).",
        "  fix: pip install 'trainwell[mlflow]' (or pip install mlflow).",
        "  fix: pip install 'trainwell[wandb]' (or pip install wandb).",
    ]
    assert list(tmp_path.iterdir()) == []


# --- torchrun ---

RANKS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import trainwell as tw
    from conftest import blobs, make_mlp

    tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=3, seed=0, progress=False, log_to="mlflow")
    """
)


@pytest.mark.slow
def test_under_torchrun_only_rank_0_logs(mlflow_uri: str, tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    name = f"torchrun-{uuid.uuid4().hex[:8]}"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_uri,
                                "MLFLOW_EXPERIMENT_NAME": name}  # fmt: skip
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(TESTS)],
                            capture_output=True, text=True, timeout=300, env=environment, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run,) = experiment_runs(mlflow_uri, name)
    assert run.data.params["world_size"] == "2"
    assert [step for step, _ in metric_history(mlflow_uri, run.info.run_id, "loss")] == [1, 2, 3]
