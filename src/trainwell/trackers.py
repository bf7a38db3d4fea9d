"""Experiment trackers: ``MLflowLogger`` and ``WandbLogger``, and what ``fit(log_to=...)`` accepts.

Owns: every call into mlflow and wandb, each made on one worker thread per tracker, so that
training never waits on a tracking server; a tracker that fails warns once and stops logging.
Must not change or stop training, and imports mlflow and wandb only when one is used.
"""

from __future__ import annotations

import importlib
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwell.callbacks import Callback
from trainwell.errors import TrainingInterrupted, check_count, config_error, describe, unknown_name_error, warn
from trainwell.history import History
from trainwell.loggers import STEP_KEY, CSVLogger, LogFolder, StepLosses, TensorBoard
from trainwell.run import Run
from trainwell.weights import ModelCheckpoint, save_weights

LogTo = str | Callback | Sequence[str | Callback] | None
TRACKERS = ("csv", "mlflow", "tensorboard", "wandb")  # log_to's names
MAX_QUEUED = 10_000  # calls waiting for a tracker's thread: past it, the tracker is not keeping up
STATE_WAIT_SECONDS = 2.0  # how long a checkpoint waits for a tracker to take the epochs queued so far
RUN_TAG = "trainwell.run"  # the MLflow tag that finds a run again when its id was not known at a checkpoint


def require(package: str, user: str) -> Any:
    """Import ``package`` for ``user``, or raise the error that names its extra.

    Raises:
        ConfigError: The package is not installed.
    """
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise config_error(
            f"{user} needs the {package} package, which is not installed.",
            f"import {package} failed ({error})",
            f"pip install 'trainwell[{package}]' (or pip install {package}).",
        ) from None


def check_log_to(log_to: Any, callbacks: Sequence[Any] = ()) -> None:
    """Check ``fit``'s ``log_to`` (and that each named tracker's library is installed) before any work.

    A logger object keeps the state of one fit's tracked run: it may appear once in a fit, in
    ``log_to`` or in ``callbacks``.

    Raises:
        ConfigError: An unknown name, a name or logger object given twice (also one both in
            ``log_to`` and ``callbacks``), an entry that is not a logger, or a tracker whose
            library is missing (naming the extra to install).

    Example:
        >>> check_log_to(["csv"])
    """
    for entry in _entries(log_to):
        if isinstance(entry, str):
            if entry not in TRACKERS:
                raise unknown_name_error("log_to", entry, TRACKERS)
            if entry in ("mlflow", "wandb", "tensorboard"):
                require(entry, f"log_to={entry!r}")
        elif not isinstance(entry, (Tracker, CSVLogger, TensorBoard)):
            raise config_error(
                "log_to takes tracker names or logger objects.",
                f"log_to entry {describe(entry)}",
                "pass 'mlflow', 'wandb', 'tensorboard', 'csv', a list of them, or trainwell.MLflowLogger(...), "
                "WandbLogger(...), TensorBoard(...), CSVLogger(...); other callbacks go in callbacks=.",
            )
    objects = [entry for entry in _entries(log_to) if not isinstance(entry, str)]
    for index, entry in enumerate(objects):
        repeated = any(other is entry for other in objects[:index])
        if repeated or any(callback is entry for callback in callbacks):
            raise config_error(
                f"The same {type(entry).__name__} object is given twice.",
                f"it is in log_to {'twice' if repeated else 'and in callbacks'}",
                "pass each logger object once, in log_to or in callbacks (one object per tracked run).",
            )
    names = [entry for entry in _entries(log_to) if isinstance(entry, str)]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise config_error(
            f"log_to names {twice!r} twice.",
            f"log_to={log_to!r}",
            f"name each tracker once: log_to={sorted(set(names))}.",
        )


def _entries(log_to: Any) -> list[Any]:
    if log_to is None:
        return []
    if isinstance(log_to, (str, Callback)):
        return [log_to]
    if isinstance(log_to, Sequence):
        return list(log_to)
    raise config_error(
        "log_to must be a tracker name, a logger object, or a list of them.",
        f"log_to={describe(log_to)}",
        "pass e.g. log_to='mlflow', log_to=['mlflow', 'csv'] or log_to=trainwell.MLflowLogger(experiment='name').",
    )


def trackers_for(log_to: LogTo) -> list[Callback]:
    """The loggers ``log_to`` asks for (checked by ``check_log_to``): a name builds one
    configured as its users configure that tracker; logger objects are used as given.

    ``"tensorboard"`` and ``"csv"`` write to one new folder, ``runs/<Mon DD_HH-MM-SS>_<host>``
    (TensorBoard's own default; created when the fit starts, ``-2``, ... appended when the name is
    taken), the CSV as ``history.csv`` there.
    """
    folder = LogFolder()
    built: list[Callback] = []
    for entry in _entries(log_to):
        if entry == "mlflow":
            built.append(MLflowLogger())
        elif entry == "wandb":
            built.append(WandbLogger())
        elif entry == "tensorboard":
            board = TensorBoard()
            board.folder = folder  # the same folder as the CSV's
            built.append(board)
        elif entry == "csv":
            logger = CSVLogger()
            logger.folder = folder
            built.append(logger)
        else:
            built.append(entry)
    return built


class Worker:
    """One daemon thread that makes a tracker's calls in order; the training thread only queues them.

    Why a thread of our own, rather than MLflow's ``synchronous=False``: that covers metric calls
    only, while creating the run, its parameters and the artifacts still block, and MLflow's HTTP
    client retries a dead server with backoff for minutes; W&B's ``init`` and ``finish`` block too.
    Changing the libraries' retry settings (environment variables) would change them for the user's
    own calls as well. Here every library call runs on this thread, training never waits on one,
    and ``fit``'s end waits for what is queued at most ``timeout`` seconds.

    Attributes:
        error: The first exception a call raised; later calls are skipped.
    """

    def __init__(self, name: str) -> None:
        self.calls: queue.Queue[Callable[[], None] | None] = queue.Queue(MAX_QUEUED)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.ran = threading.Condition()
        self.submitted = self.finished = 0  # calls queued (by the training thread) and run (by this one)
        self.thread = threading.Thread(target=self._serve, name=f"trainwell-{name}", daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        """Queue ``call`` (dropped once a call has failed)."""
        if self.error is not None:
            return
        try:
            self.calls.put_nowait(call)
        except queue.Full:
            self.error = RuntimeError(f"{MAX_QUEUED} calls are waiting: the tracker does not keep up with training")
            return
        self.submitted += 1

    def settle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the calls queued so far to have run; whether they have."""
        queued = self.submitted
        with self.ran:
            return self.ran.wait_for(lambda: self.finished >= queued or self.error is not None, timeout)

    def close(self, timeout: float) -> bool:
        """Let the queued calls run; whether they all ran within ``timeout`` seconds (in all)."""
        deadline = time.monotonic() + timeout
        try:
            self.calls.put(None, timeout=timeout)
        except queue.Full:
            return False
        return self.done.wait(max(deadline - time.monotonic(), 0))

    def _serve(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.error is None:
                try:
                    call()
                except BaseException as error:  # any failure of the library: reported by the training thread
                    self.error = error
            with self.ran:
                self.finished += 1
                self.ran.notify_all()
        self.done.set()


@dataclass(eq=False)
class Session:
    """One fit's tracked run: what the tracker's thread reads and writes. Its calls capture the
    session of their fit, never the tracker's own fields, so that the late thread of a fit that
    timed out cannot write into the run of the tracker's next fit.

    Attributes:
        config: ``run.config``; history: the fit's History.
        saved: A resumed fit's state of the tracker (from its checkpoint), else None.
        run_id: The tracked run's id (MLflow: once created; W&B: chosen before it starts).
        key: MLflow: the ``trainwell.run`` tag that finds the run when its id was not known yet.
        logged_epochs: The epochs the library took (set by the tracker's thread).
        held: A resumed run's last step of each key the library holds.
        handle: The library's object: MLflow's client, W&B's run.
        uri, same_store, active_experiment: MLflow's store and experiment, read on the training thread.
        defined: W&B: the keys given their step metric.
    """

    config: dict[str, Any]
    history: History
    saved: dict[str, Any] | None = None
    run_id: str | None = None
    key: str = ""
    logged_epochs: int = 0
    held: dict[str, int] = field(default_factory=dict)
    handle: Any = None
    uri: str = ""
    same_store: bool = True
    active_experiment: str | None = None
    defined: set[str] = field(default_factory=set)


class Tracker(Callback):
    """Base of the experiment trackers: what they log, and when, on the main process only.

    - At the first epoch: the run (a new one, or a resumed fit's own: its id is in the training
      checkpoint), with ``run.config`` (``fit``'s resolved options) as its parameters.
    - At each epoch's end: every value of ``run.logs``, with the 1-based epoch as the step; with
      ``every_n_steps``, also the batch loss as ``batch/loss`` every N optimizer steps (the step is
      the optimizer step), read from the device every few seconds, never once per step.
    - At ``fit``'s end: ``history.csv`` (the History) and, with ``log_weights``, ``weights.pt`` (a
      ``trainwell.load_weights`` file): the best epoch's file of a ``ModelCheckpoint`` in the fit
      that monitors a value, else the weights ``fit`` hands back (the best epoch's when
      ``EarlyStopping`` restores them: ``log_to``'s trackers come after the user's callbacks, so
      their end follows the restore; a tracker passed in ``callbacks=`` must come after the
      ``EarlyStopping`` to see it).

    A resumed fit continues the tracked run and offers again the epochs of the History the
    tracker may have missed. Trackers come before the checkpoint in ``fit``'s callbacks, and an
    epoch's checkpoint waits briefly for the tracker's thread (``state_dict``), so it records the
    epochs the tracked run holds. A run that dies after an epoch was logged but before its
    checkpoint trains that epoch again after resuming: MLflow, and W&B online, say which epochs
    and steps they hold, and those are not logged again, so each shows once (MLflow keeps the first
    attempt's values of such an epoch, its ``time`` included); offline W&B cannot tell, and such
    an epoch (and its steps) shows in both of its offline files, as do the epochs after a
    checkpoint whose wait for a slow tracker ran out.

    Any exception from the tracking library warns once, names the tracker and the error, and
    stops logging for the run; training goes on. Calls run on a thread of their own (``Worker``),
    so a slow or dead server never stalls training; ``fit``'s end waits for them at most ``timeout``
    seconds.
    """

    label = "tracker"
    package = ""

    def __init__(self, every_n_steps: int | None, log_weights: bool, timeout: float) -> None:
        require(self.package, type(self).__name__)
        if every_n_steps is not None:
            check_count("every_n_steps", every_n_steps)
            self.on_train_batch_end = self._log_steps  # type: ignore[method-assign]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise config_error(
                "timeout must be a number of seconds > 0.", f"timeout={timeout!r}", "pass e.g. timeout=30."
            )
        self.every_n_steps = every_n_steps
        self.log_weights = log_weights
        self.timeout = float(timeout)
        self.worker: Worker | None = None
        self.session: Session | None = None  # the current (or last) fit's
        self.step_losses: StepLosses | None = None
        self.started = False
        self.warned = False
        self.lagging = False  # a checkpoint's wait for the worker ran out

    # --- the training thread ---

    def on_fit_start(self, run: Run) -> None:
        self.worker, self.session, self.started, self.warned, self.lagging = None, None, False, False, False
        if not run.is_main_process:
            return
        session = Session(config=dict(run.config), history=run.history)
        try:
            self.prepare(run, session)
        except Exception as error:
            self._warn(error)
            return
        self.session = session
        self.step_losses = None if self.every_n_steps is None else StepLosses(self.every_n_steps)
        self.worker = Worker(self.label)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the tracked run of the checkpoint."""
        if self.session is not None:
            self.session.saved = dict(state)
            self.restore(self.session, state)

    def on_epoch_start(self, run: Run) -> None:
        session = self.session
        if self.worker is None or session is None or self.started:
            return
        self.started = True  # the first epoch of this fit: a resumed one's state is known now
        self._submit(lambda: self.open(session))
        offered = self.first_offered_epoch(session.saved)
        for epoch in range(offered, session.history.epochs):  # epochs the tracked run may lack
            row = {key: values[epoch] for key, values in session.history.items() if epoch < len(values)}
            self._submit_epoch(session, epoch + 1, row)

    def _log_steps(self, run: Run) -> None:
        if self.worker is not None and self.session is not None and self.step_losses is not None:
            pairs = self.step_losses.keep(run)
            if pairs:
                self._submit_steps(self.session, pairs)

    def on_epoch_end(self, run: Run) -> None:
        session = self.session
        if self.worker is None or session is None:
            return
        if self.step_losses is not None:
            self._submit_steps(session, self.step_losses.read())
        self._submit_epoch(session, run.epoch + 1, dict(run.logs))
        self._check()

    def on_fit_end(self, run: Run) -> None:
        worker, session, self.worker = self.worker, self.session, None
        if worker is None or session is None:
            return
        folder = Path(tempfile.mkdtemp(prefix="trainwell-"))
        try:
            if self.started:
                self._finish(run, worker, session, folder)
            if worker.close(self.timeout):
                self._check(worker)
            elif not self.warned:
                self.warned = True
                warn(
                    f"{self.label} did not finish within {self.timeout:g} s (timeout=): stopped waiting for it. The "
                    "run's last values, history.csv and weights.pt may be missing there; training itself is complete."
                )
        except Exception as error:
            self._warn(error)
        finally:
            # Removed here in every case: a worker that reaches its finish later finds no files
            # and fails on its own thread, which nobody waits for any more.
            shutil.rmtree(folder, ignore_errors=True)

    def _finish(self, run: Run, worker: Worker, session: Session, folder: Path) -> None:
        if self.step_losses is not None:
            self._submit_steps(session, self.step_losses.read(), worker)  # an epoch that did not end
        failure = run.error
        status = "FINISHED" if failure is None else "KILLED" if isinstance(failure, TrainingInterrupted) else "FAILED"
        session.history.to_csv(folder / "history.csv")
        weights = _weights(run, folder / "weights.pt") if self.log_weights else None
        worker.submit(lambda: self.finish(session, folder / "history.csv", weights, status))

    def state_dict(self) -> dict[str, Any]:
        """The tracked run and the epochs it took, for a resumed fit to continue it.

        The tracker's thread lags behind training (W&B's ``init`` alone takes about a second), so
        a checkpoint first waits, at most ``STATE_WAIT_SECONDS``, for the calls queued so far: its
        count of logged epochs is then exact. After a wait that ran out (a slow or dead server),
        later checkpoints do not wait until the thread has caught up again: training is not held
        back more than once, and a resumed offline W&B run may then log some epochs again.
        """
        worker, session = self.worker, self.session
        if session is None:
            return {}
        if worker is not None:
            self.lagging = not worker.settle(0 if self.lagging else STATE_WAIT_SECONDS)
        return {"run_id": session.run_id, "epochs": session.logged_epochs, "key": session.key}

    def _submit_epoch(self, session: Session, epoch: int, logs: dict[str, float]) -> None:
        stamp = time.time()
        self._submit(lambda: self.log_epoch(session, epoch, logs, stamp))

    def _submit_steps(self, session: Session, pairs: list[tuple[int, float]], worker: Worker | None = None) -> None:
        if pairs:
            stamp = time.time()
            self._submit(lambda: self.log_steps(session, pairs, stamp), worker)

    def _submit(self, call: Callable[[], None], worker: Worker | None = None) -> None:
        worker = worker or self.worker
        if worker is not None:
            worker.submit(call)
            if worker.error is not None:
                self._check(worker)

    def _check(self, worker: Worker | None = None) -> None:
        """Warn once when the tracker's thread failed, and stop logging."""
        worker = worker or self.worker
        if worker is not None and worker.error is not None:
            self._warn(worker.error)
            worker.close(0)  # lets its thread end once its current call returns

    def _warn(self, error: BaseException) -> None:
        self.worker = None
        if self.warned:
            return
        self.warned = True
        text = " ".join(str(error).split())
        warn(
            f"{self.label} logging failed and is off for the rest of this run; training goes on. "
            f"{type(error).__name__}: {text[:400]}{'...' if len(text) > 400 else ''}"
        )

    # --- what each tracker implements ---

    def prepare(self, run: Run, session: Session) -> None:
        """Start ``session`` in the training thread: the run's id or key, and the configuration the
        library keeps there."""

    def restore(self, session: Session, state: dict[str, Any]) -> None:
        """Take from a checkpoint's ``state`` the tracked run ``session`` continues."""
        session.run_id = state.get("run_id") or session.run_id

    def first_offered_epoch(self, saved: dict[str, Any] | None) -> int:
        """The first epoch (0-based) of the History offered again when the tracker starts."""
        return 0 if saved is None else int(saved.get("epochs", 0))

    def open(self, session: Session) -> None:
        """Start the tracked run, or continue ``session.saved``'s (on the worker thread)."""
        raise NotImplementedError

    def log_epoch(self, session: Session, epoch: int, logs: dict[str, float], stamp: float) -> None:
        """Log one epoch's values (on the worker thread)."""
        raise NotImplementedError

    def log_steps(self, session: Session, pairs: list[tuple[int, float]], stamp: float) -> None:
        """Log ``(optimizer step, batch loss)`` pairs (on the worker thread)."""
        raise NotImplementedError

    def finish(self, session: Session, history: Path, weights: Path | None, status: str) -> None:
        """Log the artifacts and end the tracked run (on the worker thread)."""
        raise NotImplementedError


def _weights(run: Run, path: Path) -> Path:
    """Write the weights a tracker logs to ``path``: the file of the best epoch of the fit's first
    ``ModelCheckpoint`` that has one (a copy: the checkpoint may change it later), else the
    weights ``fit`` hands back as they are now."""
    best = next(
        (callback.best_path for callback in run.callbacks.callbacks
         if isinstance(callback, ModelCheckpoint) and callback.best_path is not None and callback.best_path.is_file()),
        None,
    )  # fmt: skip
    if best is None:
        return save_weights(run.module, path)
    shutil.copyfile(best, path)
    return path


class MLflowLogger(Tracker):
    """Logs a fit to MLflow: parameters, per-epoch metrics, optionally the loss every N steps, and
    ``history.csv`` and ``weights.pt`` as artifacts (see ``Tracker`` for what and when).

    Without arguments it uses MLflow's own configuration: the tracking URI of
    ``mlflow.set_tracking_uri`` or ``MLFLOW_TRACKING_URI`` (else MLflow's default store), and the
    experiment of ``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME`` or ``MLFLOW_EXPERIMENT_ID``
    (else MLflow's default experiment). With a ``tracking_uri`` of another store than MLflow's
    current one, the experiment ids of ``mlflow.set_experiment`` and ``MLFLOW_EXPERIMENT_ID``
    (ids of that other store) are not used: ``MLFLOW_EXPERIMENT_NAME``, else the default
    experiment. It creates its own run with ``MlflowClient`` and leaves the user's active run
    alone. A resumed fit continues the run (also one whose id was not yet known when the checkpoint
    was written: it is found by its ``trainwell.run`` tag), and logs only the epochs and steps
    MLflow does not hold yet, so each appears once.

    Needs ``pip install 'trainwell[mlflow]'``.

    Args:
        experiment: The experiment's name (created when missing).
        run_name: The run's name (MLflow picks one when None).
        tracking_uri: Where to log, e.g. ``"http://localhost:5000"`` or ``"sqlite:///mlflow.db"``.
        tags: The run's tags.
        every_n_steps: Also log the batch loss every N optimizer steps.
        log_weights: Log the final weights as ``weights.pt``.
        timeout: The most seconds ``fit``'s end waits for MLflow to take what is still queued.

    Raises:
        ConfigError: mlflow is not installed, or an invalid argument.

    Example:
        >>> logger = MLflowLogger(experiment="digits", run_name="baseline", tags={"team": "vision"})
    """

    label = "MLflow"
    package = "mlflow"

    def __init__(
        self,
        experiment: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        every_n_steps: int | None = None,
        log_weights: bool = True,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(every_n_steps, log_weights, timeout)
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags = dict(tags or {})

    def prepare(self, run: Run, session: Session) -> None:
        mlflow = require("mlflow", "MLflowLogger")
        current = mlflow.get_tracking_uri()
        session.uri = self.tracking_uri or current
        # Experiment ids of MLflow's current store mean nothing in another one.
        session.same_store = self.tracking_uri is None or self.tracking_uri == current
        fluent = importlib.import_module("mlflow.tracking.fluent")
        session.active_experiment = getattr(fluent, "_active_experiment_id", None) if session.same_store else None
        session.key = secrets.token_hex(16)

    def restore(self, session: Session, state: dict[str, Any]) -> None:
        session.key, session.run_id = state.get("key") or session.key, state.get("run_id")

    def first_offered_epoch(self, saved: dict[str, Any] | None) -> int:
        return 0  # MLflow says which epochs it holds: every other one of the History is logged

    def open(self, session: Session) -> None:
        mlflow = importlib.import_module("mlflow")
        client = mlflow.MlflowClient(tracking_uri=session.uri)
        experiment = self._experiment(session, client)
        run_id = session.run_id
        if run_id is None and session.saved is not None:
            tag = f"tags.`{RUN_TAG}` = '{session.key}'"
            found = client.search_runs([experiment], filter_string=tag, max_results=1)
            run_id = found[0].info.run_id if found else None
        params = {key: _param(value) for key, value in session.config.items()}
        if run_id is not None:
            held = client.get_run(run_id).data.params
            params = {key: value for key, value in params.items() if key not in held}  # MLflow's are immutable
            session.held = {key: _last_step(client, run_id, key) for key in [*session.history, STEP_KEY]}
            client.update_run(run_id, status="RUNNING")
        else:
            created = client.create_run(experiment, run_name=self.run_name, tags=self.tags | {RUN_TAG: session.key})
            run_id = created.info.run_id
        session.handle, session.run_id = client, run_id
        entities = importlib.import_module("mlflow.entities")
        items = [entities.Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=items[start : start + 100])

    def _experiment(self, session: Session, client: Any) -> str:
        name = self.experiment
        if name is None:  # MLflow's own order: set_experiment, MLFLOW_EXPERIMENT_NAME, MLFLOW_EXPERIMENT_ID
            if session.active_experiment:
                return session.active_experiment
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
            if name is None:
                return (os.environ.get("MLFLOW_EXPERIMENT_ID") if session.same_store else None) or "0"  # 0: Default
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(client.create_experiment(name))
        except Exception as error:  # parallel runs of a sweep create it at once: one wins
            if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def log_epoch(self, session: Session, epoch: int, logs: dict[str, float], stamp: float) -> None:
        self._log_metrics(session, [(key, value, epoch) for key, value in logs.items()], stamp)
        session.logged_epochs = max(session.logged_epochs, epoch)

    def log_steps(self, session: Session, pairs: list[tuple[int, float]], stamp: float) -> None:
        self._log_metrics(session, [(STEP_KEY, value, step) for step, value in pairs], stamp)

    def _log_metrics(self, session: Session, values: list[tuple[str, float, int]], stamp: float) -> None:
        metric = importlib.import_module("mlflow.entities").Metric
        milliseconds = int(stamp * 1000)
        held = session.held
        items = [
            metric(key, float(value), milliseconds, step) for key, value, step in values if step > held.get(key, 0)
        ]
        for start in range(0, len(items), 1000):  # MLflow's batch limit
            session.handle.log_batch(session.run_id, metrics=items[start : start + 1000])

    def finish(self, session: Session, history: Path, weights: Path | None, status: str) -> None:
        client = session.handle
        client.log_artifact(session.run_id, str(history))
        if weights is not None:
            client.log_artifact(session.run_id, str(weights))
        client.set_terminated(session.run_id, status)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."  # older MLflow servers take 500 characters


def _last_step(client: Any, run_id: str, key: str) -> int:
    return max((metric.step for metric in client.get_metric_history(run_id, key)), default=0)


class WandbLogger(Tracker):
    """Logs a fit to Weights & Biases: the config, per-epoch values (against ``epoch``), optionally
    the loss every N steps (against ``global_step``), ``history.csv`` as a run file and the
    weights as a ``model`` artifact (see ``Tracker`` for what and when).

    Without arguments W&B's own configuration applies (``WANDB_PROJECT``, ``WANDB_MODE``,
    ``WANDB_DIR``, ``WANDB_ENTITY``, ...). The run's id is chosen before it starts, so every
    checkpoint holds it and a resumed fit continues the run (``resume="allow"``). Runs are
    created beside any run of the user's (``reinit="create_new"``), not in place of it.

    Needs ``pip install 'trainwell[wandb]'``.

    Args:
        project: The project.
        name: The run's display name.
        entity: The team or user.
        tags: The run's tags.
        group: The run's group.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``.
        dir: The folder of W&B's local files.
        every_n_steps: Also log the batch loss every N optimizer steps.
        log_weights: Log the final weights as an artifact.
        timeout: The most seconds ``fit``'s end waits for W&B to take what is still queued.
        **init_options: Further ``wandb.init`` keywords (``notes``, ``job_type``, ...).

    Raises:
        ConfigError: wandb is not installed, or an invalid argument.

    Example:
        >>> logger = WandbLogger(project="digits", name="baseline", mode="offline")
    """

    label = "W&B"
    package = "wandb"

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        tags: Sequence[str] | None = None,
        group: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,
        every_n_steps: int | None = None,
        log_weights: bool = True,
        timeout: float = 30.0,
        **init_options: Any,
    ) -> None:
        super().__init__(every_n_steps, log_weights, timeout)
        chosen = {"project": project, "name": name, "entity": entity, "tags": None if tags is None else list(tags),
                  "group": group, "mode": mode, "dir": None if dir is None else str(dir)}  # fmt: skip
        self.init_options = {key: value for key, value in chosen.items() if value is not None} | init_options

    def prepare(self, run: Run, session: Session) -> None:
        session.run_id, session.held = secrets.token_hex(4), {"epoch": 0, "global_step": 0}

    def open(self, session: Session) -> None:
        wandb = importlib.import_module("wandb")
        # reinit="create_new" (wandb >= 0.19.10): beside the user's own run, which stays as it is
        options = {"id": session.run_id, "resume": "allow", "config": session.config, "reinit": "create_new"}
        run = session.handle = wandb.init(**(options | self.init_options))
        if session.saved is not None:
            run.config.update(session.config, allow_val_change=True)
            # Online, W&B gives a resumed run its summary: the last epoch and step it holds are not
            # logged again. Offline there is none, and an epoch logged after the checkpoint
            # appears twice.
            session.held = {key: int(run.summary.get(key) or 0) for key in session.held}
        run.define_metric("epoch")
        run.define_metric("global_step")

    def _define(self, session: Session, key: str, step: str) -> None:
        if key not in session.defined:
            session.defined.add(key)
            session.handle.define_metric(key, step_metric=step)

    def log_epoch(self, session: Session, epoch: int, logs: dict[str, float], stamp: float) -> None:
        if epoch > session.held["epoch"]:
            for key in logs:
                self._define(session, key, "epoch")
            session.handle.log({"epoch": epoch, **logs})
        session.logged_epochs = max(session.logged_epochs, epoch)

    def log_steps(self, session: Session, pairs: list[tuple[int, float]], stamp: float) -> None:
        self._define(session, STEP_KEY, "global_step")
        for step, value in pairs:
            if step > session.held["global_step"]:
                session.handle.log({"global_step": step, STEP_KEY: value})

    def finish(self, session: Session, history: Path, weights: Path | None, status: str) -> None:
        wandb = importlib.import_module("wandb")
        run = session.handle
        copy = Path(run.dir) / history.name  # in the run's folder: saved as a copy, not a link to a temporary file
        shutil.copyfile(history, copy)
        run.save(str(copy), base_path=run.dir, policy="now")
        if weights is not None:
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"epochs": session.history.epochs})
            artifact.add_file(str(weights))
            run.log_artifact(artifact)
        run.finish(exit_code=0 if status == "FINISHED" else 1)
