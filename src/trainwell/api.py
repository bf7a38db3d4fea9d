"""The public entry points ``fit``, ``evaluate`` and ``predict``.

Owns: checking and normalising arguments and data before any work, choosing the default
callbacks, and building the ``Run``. Must not iterate over batches (that is ``loop``'s job).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast, get_args

import torch
from torch import nn

from trainwell import distributed, folder, loop
from trainwell.batches import Batches, Layout, resizable, to_batches
from trainwell.callbacks import Callback, CallbackList, TerminateOnNaN, check_monitorable
from trainwell.checkpoints import (
    Checkpointer,
    check_writable,
    differences,
    fingerprint,
    nothing_left,
    restore,
    restore_result,
)
from trainwell.data import TARGET_KEY, split_validation
from trainwell.doctor import check_plan, examine, explain_non_finite, left_out_note
from trainwell.errors import (
    DataError,
    check_count,
    config_error,
    data_error,
    describe,
    out_of_memory_advice,
    unknown_name_error,
    warn,
)
from trainwell.history import TIME_KEYS, History
from trainwell.losses import Decoded, LossFn, LossSpec, check_decodable, decode, resolve_loss, with_class_weight
from trainwell.metrics import Tally, several_values_prefix
from trainwell.models import (
    INFERENCE_BATCH_RANGE,
    PROBE_SAMPLES,
    float_dtype,
    inference_batch_size,
    preserved_modes,
    smallest_batch,
)
from trainwell.objective import (
    Head,
    HeadKey,
    LossArg,
    LossOptions,
    Metrics,
    Objective,
    metric_heads,
    plain_objective,
    resolve_loss_options,
    resolve_metrics,
)
from trainwell.optimizers import OPTIMIZERS, build_optimizer, check_lr, check_step_without_closure
from trainwell.outputs import OutputChoice, Selector, for_predict, resolve_output
from trainwell.precision import PrecisionName, build_precision
from trainwell.progress import ProgressDisplay, choose_mode, choose_pass_mode
from trainwell.run import Run, StepFn
from trainwell.schedules import LRScheduler, check_scheduler, scheduler_callback
from trainwell.structures import map_tensors
from trainwell.trackers import LogTo, check_log_to, trackers_for

Progress = bool | Literal["auto"]
FitProgress = bool | Literal["auto", "plot"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=)


def fit(
    model: nn.Module,
    train: Any,
    *,
    loss: LossArg | Mapping[HeadKey, LossArg] | Sequence[LossArg] | None = None,
    optimizer: str | torch.optim.Optimizer = "sgd",
    lr: float | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    shuffle: bool = True,
    metrics: Metrics = (),
    val: Any = None,
    val_split: float = 0.0,
    loss_weights: Mapping[HeadKey, float] | Sequence[float] | None = None,
    output: OutputChoice = None,
    target_key: str | None = TARGET_KEY,
    callbacks: Callback | Sequence[Callback] = (),
    scheduler: str | Any | None = None,
    precision: PrecisionName = "fp32",
    compile: bool | str = False,
    grad_accum_steps: int = 1,
    clip_grad_norm: float | None = None,
    clip_grad_value: float | None = None,
    class_weight: Mapping[int, float] | Sequence[float] | torch.Tensor | None = None,
    terminate_on_nan: bool | Literal["auto"] = "auto",
    step: StepFn | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool | Literal["auto"] | str | Path = False,
    device: str | torch.device = "auto",
    progress: FitProgress = "auto",
    log_to: LogTo = None,
    seed: int | None = None,
    **optimizer_options: Any,
) -> History:
    """Train ``model`` on ``train`` and return the per-epoch History.

    Every argument and the first batch are checked before any weight changes. Loss and
    metrics are averaged over the samples of each epoch (a smaller last batch counts by its
    size) and computed from the training step's own outputs.

    Args:
        model: Any ``torch.nn.Module``. It is moved to ``device`` and trained in place; its
            train/eval mode is restored when ``fit`` returns.
        train: ``(inputs, targets)`` as tensors or numpy arrays (inputs may be a tuple or dict of
            them for ``model(*inputs)`` / ``model(**inputs)``; targets a tuple or dict of them for
            several output heads), a dict holding ``labels`` (Hugging Face style), a torch
            Dataset or IterableDataset, a DataLoader, or an iterable of such batches.
        loss: A name (``mse``, ``l1``, ``huber``, ``cross_entropy``, ``bce``, ``bce_with_logits``,
            ``nll``) or ``callable(outputs, targets) -> scalar tensor`` (the batch mean); a dict
            by output name (or a sequence by position) for several output heads. None trains on
            the loss the model returns in its outputs (a Hugging Face model given ``labels``).
            Classification losses skip targets equal to their ``ignore_index`` (-100, or a torch
            loss's own, e.g. ``nn.CrossEntropyLoss(ignore_index=255)``), and then the epoch's
            values and the gradients average over the positions that count.
        optimizer: A name (``sgd``, ``adam``, ``adamw``, ``rmsprop``) or an optimizer instance,
            used as given.
        lr: Learning rate of a named optimizer (default 0.01 for sgd, 0.001 for the others).
        epochs: Number of passes over ``train``.
        batch_size: Samples per batch, unless ``train``/``val`` are DataLoaders or batch iterables.
        shuffle: Reshuffle in-memory data and Datasets every epoch.
        metrics: Names (``accuracy``, ``top5_accuracy``, ``mae``, ``mse``, ``rmse``), callables
            ``(outputs, targets) -> tensor``, or torchmetrics-style objects; a dict by output
            name for several heads (logged as ``<head>_<metric>``).
        val: Validation data, of the same kinds as ``train``.
        val_split: Fraction of ``train`` (in memory or a Dataset) held out for validation when
            ``val`` is None; a random subset, reproducible with ``seed``.
        loss_weights: Each head's factor in the total loss, by name (or position).
        output: Which of the model's outputs is the prediction the loss and metrics read, when
            it returns several: a key, a position, or a function of the outputs. By default the
            tensor itself, a Mapping's (``ModelOutput``'s) ``logits``, a tuple's first element.
        target_key: Batches that are one dict (or ``BatchEncoding``) hold their targets under
            this key; the model gets it too when its ``forward`` takes it.
        callbacks: ``trainwell.Callback`` objects, called in order before the display (one alone
            is taken as a list of one, as Keras and Lightning take it).
        scheduler: A learning-rate schedule: ``"step"``, ``"cosine"`` (with warm-up),
            ``"onecycle"``, ``"reduce_on_plateau"``, a ``trainwell.LRScheduler``, or a torch
            scheduler over ``optimizer`` (stepped per epoch). The lr of each epoch is logged as ``lr``.
        precision: ``"fp32"``, ``"bf16"`` (autocast; works on the CPU) or ``"fp16"`` (autocast with
            a grad scaler; CUDA).
        compile: Train a ``torch.compile``d model: ``True`` (torch's default mode) or a mode name,
            ``"reduce-overhead"`` (CUDA graphs: the step's kernels replayed with one launch, for
            steps bound by launch overhead; each batch shape records its own graph, so a ragged
            last batch or padding to each batch's longest sequence records several),
            ``"max-autotune"`` (also with CUDA graphs on a GPU) or ``"max-autotune-no-cudagraphs"``.
            Saved weights keep the plain module's keys.
        grad_accum_steps: Batches per optimizer step; the update equals one batch of all their
            samples (a partial last window is stepped at the end of the epoch).
        clip_grad_norm: Clip the gradients' total norm to this before each step.
        clip_grad_value: Clip each gradient element to ``[-value, value]`` before each step.
        class_weight: Weight of each class for classification losses, as ``{class: weight}`` or
            a sequence; computed exactly as torch's weighted losses. Per-sample weights come as a
            third data element: ``(x, y, sample_weight)``.
        terminate_on_nan: Stop before a non-finite loss changes the weights. ``"auto"`` checks on
            the CPU, where it is free, not on GPUs, where it would read a value every step.
        step: A custom training step ``step(run, batch)`` that does the whole update and returns
            its loss, a dict of named losses or a ``StepResult`` (see ``trainwell.train_step``).
        checkpoint_dir: Save the full training state here at the end of every epoch (atomically;
            the last two complete checkpoints are kept). Checked for writing before training.
        checkpoint_every: Also save every this many optimizer steps (mid-epoch).
        resume: ``True`` continues from the newest intact checkpoint in ``checkpoint_dir`` (an
            error if there is none), ``"auto"`` does so when there is one and starts fresh
            otherwise, a path names a checkpoint file or folder. The continuation is exact: the
            same final weights as an uninterrupted run. Ctrl-C or SIGTERM with ``checkpoint_dir``
            finishes the step, saves, and raises ``TrainingInterrupted``.
        device: ``"auto"`` (cuda, else mps, else cpu), or any torch device or string.
        progress: ``"auto"`` (a live line in a terminal, one line per epoch in logs, and in a
            notebook one display updated in place: a bar during each epoch above a table of the
            epochs, the best value of each column in bold), True (the live line even when the
            output is not a terminal), ``"plot"`` (in a notebook, also a live chart of the loss
            and metrics; elsewhere as ``"auto"``), or False (print nothing).
        log_to: Experiment trackers to log the run to: ``"mlflow"``, ``"wandb"``, ``"tensorboard"``,
            ``"csv"``, a list of them, or logger objects for full control (``trainwell.MLflowLogger``,
            ``WandbLogger``, ``TensorBoard``, ``CSVLogger``). A name takes the tracker's own
            configuration (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``; ``WANDB_PROJECT``,
            ``WANDB_MODE``, ...); ``"tensorboard"`` and ``"csv"`` write to a new folder
            ``runs/<Mon DD_HH-MM-SS>_<host>`` (``-2``, ... when the name is taken). Trackers log
            the resolved options as parameters, every epoch's values, and at the end the History
            and the weights (a ModelCheckpoint's best file, else those ``fit`` returns); they run
            after ``callbacks``; only rank 0 logs; a resumed fit continues the same tracked run; a
            tracker that fails warns once and training goes on. A logger object may appear once,
            here or in ``callbacks``. None (the default) logs nowhere.
        seed: Makes the data order, ``val_split`` and torch's random numbers (dropout)
            reproducible; it seeds torch's global generator.
        **optimizer_options: Extra arguments of a named optimizer, e.g. ``momentum=0.9``.

    Returns:
        The History: ``history["loss"]``, ``history["val_accuracy"]``, ... one float per epoch,
        and each epoch's ``time`` (seconds) and ``samples_per_second`` (training speed).

    Raises:
        ConfigError: An invalid argument (unknown name, epochs < 1, ...), with the fix.
        DataError: Data that does not fit the model or loss (no targets, label out of range,
            shapes torch would broadcast, ...), with the fix.

    Example:
        >>> import torch, trainwell
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> model = torch.nn.Linear(4, 3)
        >>> history = trainwell.fit(model, (x, y), loss="cross_entropy", epochs=2,
        ...                         metrics=["accuracy"], progress=False, seed=0)
        >>> history.epochs, sorted(history)
        (2, ['accuracy', 'loss', 'samples_per_second', 'time'])
    """
    callbacks = _listed(callbacks)
    options = FitOptions(
        loss=loss, optimizer=optimizer, lr=lr, epochs=epochs, batch_size=batch_size, shuffle=shuffle,
        metrics=metrics, val=val, val_split=val_split, loss_weights=loss_weights, output=output,
        target_key=target_key, callbacks=callbacks, scheduler=scheduler,
        precision=precision, compile=compile, grad_accum_steps=grad_accum_steps, clip_grad_norm=clip_grad_norm,
        clip_grad_value=clip_grad_value, class_weight=class_weight, terminate_on_nan=terminate_on_nan, step=step,
        checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=resume, device=device,
        progress=progress, log_to=log_to, seed=seed, optimizer_options=optimizer_options,
    )  # fmt: skip
    checked = options.check(model)  # every option, before any side effect
    job = distributed.setup()  # first: in a job, no process touches files before all have joined
    target = _job_device(job, checked.device)
    loss_options = checked.loss_options
    if loss_options is not None and checked.class_weight is not None:
        loss_options = _with_class_weight(loss_options, checked.class_weight.to(target))
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    if directory is not None:
        check_writable(directory)
    rank, world_size = (0, 1) if job is None else (job.rank, job.world_size)
    with folder.owned(directory, rank, world_size):  # locked by this fit until it ends, however it ends
        return _fit(model, train, options, checked, job, target, loss_options, directory)


def _fit(
    model: nn.Module,
    train: Any,
    options: FitOptions,
    checked: CheckedOptions,
    job: distributed.Distributed | None,
    target: torch.device,
    loss_options: LossOptions | None,
    directory: Path | None,
) -> History:
    """``fit`` once its options are checked, its job joined and its checkpoint folder held."""
    rank, world_size = (0, 1) if job is None else (job.rank, job.world_size)
    state = folder.resume_state(options.resume, directory, rank, world_size)
    if state is None and options.resume == "auto":
        _say([f"No checkpoint to resume in {directory}: starting from the beginning."], job)
    seed = _resolve_seed(options.seed, state, job)
    dtype = float_dtype(model)
    val = options.val
    if options.val_split:
        train, val = split_validation(train, options.val_split, seed, dtype, options.target_key)
    train_batches = to_batches(train, batch_size=options.batch_size, shuffle=options.shuffle, seed=seed, device=target,
                               dtype=dtype, target_key=options.target_key)  # fmt: skip
    val_batches = None
    if val is not None:
        val_batches = to_batches(val, batch_size=options.batch_size, shuffle=False, seed=seed, device=target,
                                 dtype=dtype, target_key=options.target_key)  # fmt: skip
    model.to(target)
    built_optimizer = build_optimizer(options.optimizer, model, options.lr, options.optimizer_options)
    if options.step is None:
        check_step_without_closure(built_optimizer)
    notes, objective = _prepare(model, loss_options, options, train_batches, val_batches, job, target)
    _say(notes + _job_notes(job, options.batch_size), job)

    everything = [*options.callbacks, *_built_in_callbacks(options, train_batches, val_batches is not None, target),
                  *_display(options.progress, job)]  # fmt: skip
    train_tally, val_tally = (
        _tally(options.metrics, objective, loss_options, prefix, options.step is None) for prefix in ("", "val_")
    )
    runnable = _compiled(model, options.compile)
    run = Run(
        model=runnable if job is None else distributed.wrap(runnable, target),
        module=model,
        optimizer=built_optimizer,
        objective=objective,
        train_tally=train_tally,
        val_tally=val_tally,
        precision=build_precision(options.precision, target),
        device=target,
        callbacks=CallbackList(everything),
        step=options.step or loop.train_step,
        train_batches=train_batches,
        val_batches=val_batches,
        epochs=options.epochs,
        seed=seed,
        parameters=[parameter for parameter in model.parameters() if parameter.requires_grad],
        grad_accum_steps=options.grad_accum_steps,
        window_size=options.grad_accum_steps * (train_batches.batch_size or 0) * (1 if job is None else job.world_size),
        clip_grad_norm=options.clip_grad_norm,
        clip_grad_value=options.clip_grad_value,
        is_main_process=job is None or job.is_main_process,
        rank=0 if job is None else job.rank,
        world_size=1 if job is None else job.world_size,
        reduce=None if job is None else distributed.all_reduce_sum,
        config=_resolved_options(options, model, built_optimizer, train_batches, val_batches, train_tally, seed,
                                 target, job),
    )  # fmt: skip
    if state is not None:
        if _already_done(run, state):
            return run.history
        restore(run, state)
    built_optimizer.zero_grad(set_to_none=True)
    with (
        preserved_modes(model, training=True),
        out_of_memory_advice("fit", train_batches.batch_size, train_batches.num_samples),
    ):
        loop.fit_loop(run)
    return run.history


def _resolved_options(
    options: FitOptions,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches,
    val: Batches | None,
    tally: Tally,
    seed: int,
    device: torch.device,
    job: distributed.Distributed | None,
) -> dict[str, Any]:
    """``run.config``: fit's options as the run resolved them (trackers log them as parameters).

    Plain Python values only (numbers, strings, booleans, None, tuples and dicts of them), made
    here on the training thread: a tracker's thread reads them later, and an optimizer's live
    tensors (``lr=torch.tensor(...)``) change under it as training goes.
    """
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    hyperparameters = {
        f"optimizer_{key}": value
        for key, value in group.items()
        if key not in _IMPLEMENTATION_FLAGS and _is_plain(value)
    }
    metrics = [slot.name for slot in tally.slots]
    config = {
        "model": type(model).__name__,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable_parameters": sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad),
        "train_samples": train.num_samples,
        "val_samples": None if val is None else val.num_samples,
        "val_split": options.val_split if options.val is None else None,
        "epochs": options.epochs,
        "batch_size": train.batch_size,
        "shuffle": options.shuffle,
        "optimizer": type(optimizer).__name__,
        "lr": group.get("lr"),
        **hyperparameters,
        "loss": _name_of(options.loss) if options.step is None or options.loss is not None else "custom step",
        "loss_weights": options.loss_weights,
        "class_weight": options.class_weight is not None,
        "metrics": ", ".join(metrics),
        "scheduler": None if options.scheduler is None else _name_of(options.scheduler),
        "precision": options.precision,
        "grad_accum_steps": options.grad_accum_steps,
        "clip_grad_norm": options.clip_grad_norm,
        "clip_grad_value": options.clip_grad_value,
        "terminate_on_nan": options.terminate_on_nan is True
        or (options.terminate_on_nan == "auto" and device.type == "cpu"),
        "checkpoint_every": options.checkpoint_every,
        "seed": seed,
        "device": str(device),
        "world_size": 1 if job is None else job.world_size,
        "compile": options.compile,
    }
    return {key: _plain(value) for key, value in config.items()}


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a number, a string, a one-element tensor, or a tuple of them."""
    if isinstance(value, tuple):
        return all(_is_plain(item) for item in value)
    return isinstance(value, (bool, int, float, str)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def _plain(value: Any) -> Any:
    """``value`` as plain Python: a one-element tensor's number (read once, here), tuples and
    mappings element-wise, anything else but numbers, strings and None as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(item) for item in value)
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return str(value)


_IMPLEMENTATION_FLAGS = ("lr", "foreach", "fused", "capturable", "differentiable")  # how torch steps, not what


def _name_of(value: Any) -> str:
    """A short name of a loss, metric or scheduler as given: a name, a class, a function."""
    if value is None:
        return "the model's own loss"
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return ", ".join(f"{key}: {_name_of(item)}" for key, item in value.items())
    if isinstance(value, Sequence):
        return ", ".join(_name_of(item) for item in value)
    return str(getattr(value, "__name__", type(value).__name__))


@dataclass(frozen=True)
class FitOptions:
    """``fit``'s keywords, kept flat in its signature (as Keras users expect them) and gathered
    here once, so that they are checked together before anything is built or touched."""

    loss: Any
    optimizer: str | torch.optim.Optimizer
    lr: float | None
    epochs: int
    batch_size: int
    shuffle: bool
    metrics: Metrics
    val: Any
    val_split: float
    loss_weights: Mapping[HeadKey, float] | Sequence[float] | None
    output: OutputChoice
    target_key: str | None
    callbacks: Sequence[Callback]
    scheduler: Any
    precision: PrecisionName
    compile: bool | str
    grad_accum_steps: int
    clip_grad_norm: float | None
    clip_grad_value: float | None
    class_weight: Mapping[int, float] | Sequence[float] | torch.Tensor | None
    terminate_on_nan: bool | str
    step: StepFn | None
    checkpoint_dir: str | Path | None
    checkpoint_every: int | None
    resume: bool | str | Path
    device: str | torch.device
    progress: FitProgress
    log_to: LogTo
    seed: int | None
    optimizer_options: Mapping[str, Any]

    def check(self, model: Any) -> CheckedOptions:
        """Check every option (no file, folder, process group or device is touched).

        Raises:
            ConfigError: The first invalid option, with the fix.
        """
        _check_model(model)
        self._check_plain_values()
        self._check_validation()
        self._check_step()
        self._check_checkpointing()
        check_log_to(self.log_to, self.callbacks)
        check_lr(self.lr)
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise unknown_name_error("optimizer", self.optimizer, OPTIMIZERS)
        if self.scheduler is not None:
            check_scheduler(self.scheduler)
        device = _resolve_device(self.device)
        build_precision(self.precision, device)
        loss_options = resolve_loss_options(
            self.loss, loss_weights=self.loss_weights, metric_heads=metric_heads(self.metrics), output=self.output,
            custom_step=self.step is not None,
        )  # fmt: skip
        slots = resolve_metrics(self.metrics, None, loss_options)
        names = [*(loss_options.loss_keys if loss_options is not None else []), *(slot.name for slot in slots)]
        if isinstance(self.metrics, Mapping):  # its keys name the metrics of a model returning one tensor
            names += [str(key) for key in self.metrics]
        several = [several_values_prefix(slot) for slot in slots]  # their keys are known once they ran
        clash = next((name for name in names if name in TIME_KEYS), None)
        if clash is not None:
            raise config_error(
                f"{clash!r} is the History's own column (the epoch's timing), so a metric cannot be logged under it.",
                f"a metric named {clash!r}",
                f"name it otherwise, e.g. metrics={{'my_{clash}': ...}}.",
            )
        has_val = self.val is not None or bool(self.val_split)
        keys = names + [f"val_{name}" for name in names if has_val] + (["lr"] if self.scheduler is not None else [])
        schedule = [self.scheduler] if isinstance(self.scheduler, LRScheduler) else []
        _check_monitors([*CallbackList(self.callbacks).callbacks, *schedule], keys, self.step,
                        [prefix for prefix in several if prefix is not None])  # fmt: skip
        weights = None if self.class_weight is None else _class_weight_tensor(self.class_weight)
        if weights is not None:
            _with_class_weight(loss_options, weights)  # a loss without classes is refused here
        return CheckedOptions(device, loss_options, weights)

    def _check_plain_values(self) -> None:
        check_count("epochs", self.epochs)
        check_count("batch_size", self.batch_size)
        check_count("grad_accum_steps", self.grad_accum_steps)
        if self.seed is not None:
            check_count("seed", self.seed, minimum=0)
        for name, value, choices in (
            ("shuffle", self.shuffle, (True, False)),
            ("progress", self.progress, (True, False, "auto", "plot")),
            ("compile", self.compile, (True, False, *COMPILE_MODES)),
            ("terminate_on_nan", self.terminate_on_nan, (True, False, "auto")),
        ):
            _check_choice(name, value, choices)
        if self.target_key is not None and not isinstance(self.target_key, str):
            raise config_error(
                "target_key must be the key of the targets in dict batches, or None.",
                f"target_key={self.target_key!r}",
                "pass e.g. target_key='labels' (the default).",
            )
        for name, clip in (("clip_grad_norm", self.clip_grad_norm), ("clip_grad_value", self.clip_grad_value)):
            if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
                raise config_error(
                    f"{name} must be a number > 0.", f"{name}={clip!r}", f"pass e.g. {name}=1.0, or None."
                )

    def _check_validation(self) -> None:
        val_split = self.val_split
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 <= val_split < 1:
            raise config_error(
                "val_split must be a fraction in [0, 1).", f"val_split={val_split!r}", "pass e.g. val_split=0.1."
            )
        if val_split and self.val is not None:
            raise config_error(
                "Pass either val or val_split, not both.",
                f"val={describe(self.val)}, val_split={val_split}",
                "drop val_split to use the given validation data.",
            )

    def _check_step(self) -> None:
        if self.step is not None and not callable(self.step):
            raise config_error(
                "step must be a function step(run, batch).", describe(self.step), "see trainwell.train_step."
            )
        if self.step is not None and self.grad_accum_steps > 1:
            raise config_error(
                "A custom step does its own updates, so fit cannot accumulate its gradients.",
                f"step={describe(self.step)}, grad_accum_steps={self.grad_accum_steps}",
                "accumulate inside the step (call optimizer.step() every k batches), or drop grad_accum_steps.",
            )

    def _check_checkpointing(self) -> None:
        if not isinstance(self.resume, (bool, str, Path)):
            raise config_error(
                "resume must be True, False, 'auto' or a checkpoint path.",
                f"resume={self.resume!r}",
                "pass resume=True to continue from checkpoint_dir, or resume='auto'.",
            )
        if self.checkpoint_every is not None:
            check_count("checkpoint_every", self.checkpoint_every)
            if self.checkpoint_dir is None:
                raise config_error(
                    "checkpoint_every needs checkpoint_dir.",
                    f"checkpoint_every={self.checkpoint_every}",
                    "pass checkpoint_dir=PATH.",
                )
        if (self.resume is True or self.resume == "auto") and self.checkpoint_dir is None:
            raise config_error(
                "resume needs checkpoint_dir (or a checkpoint path).",
                f"resume={self.resume!r}",
                "pass checkpoint_dir=PATH.",
            )


@dataclass(frozen=True)
class CheckedOptions:
    """What checking the options resolved: the requested device, the losses, the class weights."""

    device: torch.device
    loss_options: LossOptions | None
    class_weight: torch.Tensor | None


def _with_class_weight(options: LossOptions | None, class_weight: torch.Tensor) -> LossOptions:
    """The loss options with class weights in their one classification loss.

    Raises:
        ConfigError: No loss, several heads, or a loss without classes.
    """
    head = None if options is None or options.heads[0].key is not None else options.heads[0]
    if options is None or head is None or head.spec is None:
        raise config_error(
            "class_weight needs one classification loss.",
            f"class_weight with loss={'None' if options is None or head is not None else 'given per head'}",
            "pass loss='cross_entropy' (or another named loss); weigh a head's classes with "
            "torch.nn.CrossEntropyLoss(weight=...).",
        )
    weighted = replace(head, spec=with_class_weight(head.spec, class_weight))
    return replace(options, heads=(weighted, *options.heads[1:]))


def _built_in_callbacks(options: FitOptions, train: Batches, has_val: bool, device: torch.device) -> list[Callback]:
    """The callbacks ``fit``'s options ask for, after the user's and before the display."""
    added: list[Callback] = []
    if options.scheduler is not None:
        batches = train.num_batches
        steps = None if batches is None else -(-batches // options.grad_accum_steps)
        added.append(
            scheduler_callback(options.scheduler, epochs=options.epochs, steps_per_epoch=steps, has_val=has_val)
        )
    if options.terminate_on_nan is True or (options.terminate_on_nan == "auto" and device.type == "cpu"):
        added.append(TerminateOnNaN())
    # Trackers before the Checkpointer: an epoch's checkpoint records the epochs its trackers have
    # taken, after waiting briefly for their threads (Tracker.state_dict); an epoch logged but not
    # yet checkpointed when a run dies is trained, and offered to the trackers, again on resume.
    added += trackers_for(options.log_to)
    if options.checkpoint_dir is not None:
        added.append(Checkpointer(Path(options.checkpoint_dir), options.checkpoint_every))
    return added


def _prepare(
    model: nn.Module,
    loss_options: LossOptions | None,
    options: FitOptions,
    train: Batches,
    val: Batches | None,
    job: distributed.Distributed | None,
    device: torch.device,
) -> tuple[list[str], Objective | None]:
    """Examine the data with the model, resolve the objective, apply the doctor's repairs, plan
    the batches.

    A custom step decides itself what the model is called on, so its data is only checked for
    NaN and inf (and its ``compute_loss`` reads the outputs as they are). Returns the notes to
    show and the objective.
    """
    rank, world = (0, 1) if job is None else (job.rank, job.world_size)
    custom_step = options.step is not None
    diagnosis = examine(model, loss_options, train, role="training data", needs_targets=not custom_step,
                        device=device, metrics=options.metrics, run_model=not custom_step,
                        target_key=options.target_key)  # fmt: skip
    objective = diagnosis.objective
    if custom_step and loss_options is not None:
        objective = plain_objective(loss_options)
    for repair in diagnosis.repairs:
        train.repair(repair)
    minimum = smallest_batch(model)
    train.lay_out(Layout(rank, world, lockstep=True, min_batch=minimum))
    check_plan(train, minimum, world)
    notes = diagnosis.notes + left_out_note(train)
    if val is not None:
        checked = examine(model, loss_options, val, role="validation data", needs_targets=objective is not None,
                          device=device, metrics=options.metrics, run_model=not custom_step, objective=objective,
                          target_key=options.target_key)  # fmt: skip
        for repair in checked.repairs:
            val.repair(repair)
        val.lay_out(Layout(rank, world, lockstep=False))
        notes += checked.notes
        objective = checked.objective or objective  # with sample weights when the validation data has them
    return notes, objective


def _tally(
    metrics: Metrics, objective: Objective | None, options: LossOptions | None, prefix: str = "", heads: bool = True
) -> Tally:
    """Fresh sums for one pass: the losses (each head's too, unless a custom step computes them) and the metrics."""
    has_loss = objective.has_loss if objective is not None else options is not None
    named = options.loss_keys[1:] if options is not None and has_loss and heads else []
    return Tally(resolve_metrics(metrics, objective, options), has_loss=has_loss, prefix=prefix, named_keys=named)


def _resolve_seed(seed: int | None, state: dict[str, Any] | None, job: distributed.Distributed | None) -> int:
    """The run's seed: a resumed run's own (its data order and val_split), the given one (which
    also seeds torch's generator), or one drawn from torch's generator (rank 0's, in a job)."""
    if state is not None:
        return int(state["position"]["seed"])
    if seed is None:
        drawn = int(torch.randint(0, 2**62, ()).item())
        return drawn if job is None else int(distributed.broadcast(drawn))
    torch.manual_seed(seed)
    return seed


def _job_device(job: distributed.Distributed | None, device: str | torch.device) -> torch.device:
    requested = _resolve_device(device)
    return requested if job is None else distributed.device_for(job, requested)


def _job_notes(job: distributed.Distributed | None, batch_size: int) -> list[str]:
    if job is None:
        return []
    return [
        f"Training on {job.world_size} processes: batch_size={batch_size} per process, "
        f"{batch_size * job.world_size} per optimizer step."
    ]


def _launch_hint(processes: int) -> str:
    """How to start a job on the checkpoint's number of processes."""
    if processes == 1:
        return " (python script.py: 1 process)"
    return f" (torchrun --nproc_per_node={processes} script.py: {processes} processes)"


def _already_done(run: Run, state: dict[str, Any]) -> bool:
    """Refuse a checkpoint of another setup; for a finished run, load its result and say so."""
    changed = differences(state["fingerprint"], fingerprint(run))
    if changed:
        raise config_error(
            "The checkpoint was written by a different training setup; resuming would not continue it.",
            "; ".join(changed),
            "resume with the same model, optimizer, batch size, data and number of processes"
            f"{_launch_hint(state['fingerprint'].get('world_size', 1))}, or start afresh in another checkpoint_dir.",
        )
    done = nothing_left(state, run.epochs)
    if done is None:
        return False
    restore_result(run, state)
    _say([done])
    return True


def _check_monitors(
    callbacks: Sequence[Callback], keys: list[str], step: StepFn | None, open_prefixes: Sequence[str] = ()
) -> None:
    """Every callback's ``monitor`` must name a value that the run will log. A custom step's own
    values, and the keys of metrics with several values (``f1_per_class``, a function returning
    a dict: those starting with one of ``open_prefixes``), are known only once they ran: those
    are checked when they are read."""
    available = [*keys, *(key for callback in callbacks for key in getattr(callback, "adds_logs", ()))]
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor is not None:
            check_monitorable(monitor)
        if monitor is None or monitor in available or (step is not None and not monitor.startswith("val_")):
            continue
        if any(monitor.removeprefix("val_").startswith(prefix) for prefix in open_prefixes):
            continue
        hint = " (there is no validation data: pass val= or val_split=)" if monitor.startswith("val_") else ""
        raise config_error(
            f"{type(callback).__name__} monitors {monitor!r}, which this run will never log{hint}.",
            f"monitor={monitor!r}",
            f"monitor one of: {', '.join(available)}.",
        )


def _class_weight_tensor(class_weight: Mapping[int, float] | Sequence[float] | torch.Tensor) -> torch.Tensor:
    if isinstance(class_weight, Mapping):
        if not class_weight or not all(isinstance(key, int) and key >= 0 for key in class_weight):
            raise config_error(
                "class_weight keys must be class indices (integers >= 0).",
                f"class_weight={class_weight!r}",
                "pass e.g. class_weight={0: 1.0, 1: 5.0}.",
            )
        weights = torch.ones(max(class_weight) + 1)
        for key, value in class_weight.items():
            weights[key] = float(value)
        return weights
    weights = torch.as_tensor(class_weight, dtype=torch.float32)
    if weights.dim() != 1 or not bool((weights >= 0).all()):
        raise config_error(
            "class_weight must hold one non-negative weight per class.", describe(weights), "pass e.g. [1.0, 5.0]."
        )
    return weights


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    loss: LossArg | Mapping[HeadKey, LossArg] | Sequence[LossArg] | None = None,
    metrics: Metrics = (),
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    loss_weights: Mapping[HeadKey, float] | Sequence[float] | None = None,
    output: OutputChoice = None,
    target_key: str | None = TARGET_KEY,
    callbacks: Callback | Sequence[Callback] = (),
    progress: Progress = "auto",
    return_outputs: bool = False,
) -> Any:
    """Score ``model`` on ``data``: the loss and metrics averaged over every sample (over every
    counted position when the targets have ignored positions).

    Runs in eval mode under ``torch.inference_mode()``; the model's modes are restored after.

    Args:
        model: The model.
        data: The same kinds as ``fit``'s ``train``; it must have targets.
        loss: As in ``fit``. Without it, the model's own loss is reported when its outputs carry
            one (a Hugging Face model given ``labels``).
        metrics: As in ``fit``.
        batch_size: Samples per batch for in-memory data and Datasets. By default it is chosen
            from the model on a probe of two samples: large (up to 4096) when a sample is little
            work, so that the per-batch cost is amortised; 256 for heavier models and for work
            it cannot count; smaller when a batch's activations would not fit (2 GiB on the CPU,
            a quarter of a GPU's free memory). A DataLoader keeps its own.
        device: As in ``fit``.
        loss_weights, output, target_key: As in ``fit``.
        callbacks: ``trainwell.Callback`` objects (or one alone), given ``on_eval_start``,
            ``on_eval_batch_end`` after each batch and ``on_eval_end``; one that sets
            ``run.stop_training = True`` ends the pass after that batch.
        progress: As in ``fit``: ``"auto"`` is a live line in a terminal and, in a notebook or a
            log, nothing unless the pass runs long (a line every 30 s); True always shows it;
            False prints nothing. Only rank 0 shows it under torchrun.
        return_outputs: Also give back what was scored: an ``Evaluation(values, outputs,
            targets)``, the prediction the loss and metrics read (``output=`` picks it; a dict
            by head for several heads) and the targets, on the CPU in input order (gathered
            on rank 0 under torchrun, None on the other ranks).

    Returns:
        ``{"loss": ..., "<metric>": ...}`` as floats; after a stop, over the batches evaluated
        until then (on every process). With ``return_outputs``, an ``Evaluation`` holding them
        (it unpacks as ``values, outputs, targets``).

    Raises:
        ConfigError / DataError: As in ``fit``.

    Example:
        >>> import torch, trainwell
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
        >>> sorted(trainwell.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy"]))
        ['accuracy', 'loss']
    """
    _check_model(model)
    _check_batch_size(batch_size)
    listed = _pass_callbacks(callbacks, progress)
    options = resolve_loss_options(loss, loss_weights=loss_weights, metric_heads=metric_heads(metrics), output=output)
    resolve_metrics(metrics, None, options)  # unknown or duplicate names, before any work
    job = distributed.setup()
    target = _job_device(job, device)
    model.to(target)
    batches = _inference_batches(data, batch_size, job, target, model, target_key=target_key)
    diagnosis = examine(model, options, batches, role="evaluation data", needs_targets=True, device=target,
                        metrics=metrics, scan_values=False, target_key=target_key,
                        needs_loss=not metrics)  # fmt: skip
    for repair in diagnosis.repairs:
        batches.repair(repair)
    _say(diagnosis.notes, job)
    objective = diagnosis.objective
    tally = _tally(metrics, objective, options)
    collector = _Collector(objective) if return_outputs else None
    display = _display(progress, job, own_pass=True)
    run = _inference_run(model, target, tally, objective, [*listed, *([collector] if collector else []), *display], job)
    run.reduce = None if job is None else distributed.all_reduce_sum
    with out_of_memory_advice("evaluate", batches.batch_size, batches.num_samples), _closed_on_error(display, run):
        results = loop.eval_epoch(run, batches, tally, stoppable=True)
    explain_non_finite(batches, "evaluation data", results)  # NaN results from NaN data: say where it is
    if collector is None:
        return results
    return Evaluation(results, *(_in_input_order(parts, job) for parts in (collector.outputs, collector.targets)))


class Evaluation(NamedTuple):
    """What ``evaluate(..., return_outputs=True)`` gives back.

    Attributes:
        values: The loss and metrics, as ``evaluate`` returns them.
        outputs: The prediction the loss and metrics read, per sample in input order, on the
            CPU (a dict by head for several heads); None on ranks other than 0 under torchrun.
        targets: The targets, likewise.
    """

    values: dict[str, float]
    outputs: Any
    targets: Any


class _Collector(Callback):
    """Keeps each evaluated batch's prediction and targets (on the device: no synchronisation)."""

    def __init__(self, objective: Objective | None) -> None:
        self.objective = objective
        self.outputs: list[Any] = []
        self.targets: list[Any] = []

    def on_eval_batch_end(self, run: Run) -> None:
        assert run.batch is not None
        heads = self.objective.heads if self.objective is not None else ()
        outputs, targets = run.outputs, run.batch.targets
        if len(heads) == 1:
            outputs, targets = _scored(heads[0], outputs, targets)
        elif heads:
            scored = {head.name: _scored(head, outputs, targets) for head in heads}
            outputs, targets = ({name: pair[index] for name, pair in scored.items()} for index in (0, 1))
        else:
            outputs = for_predict(outputs)
        self.outputs.append(map_tensors(outputs, torch.Tensor.detach))
        self.targets.append(map_tensors(targets, torch.Tensor.detach))


def _scored(head: Head, outputs: Any, targets: Any) -> tuple[Any, Any]:
    """A head's prediction and targets per sample, as its loss and metrics pair them (a causal
    language model's own loss scores position t against label t + 1)."""
    prediction, target = head.output(outputs), head.target(targets)
    return (prediction[:, :-1], target[:, 1:]) if head.shift else (prediction, target)


def _in_input_order(parts: list[Any], job: distributed.Distributed | None, all_ranks: bool = False) -> Any:
    """A pass's per-batch tensors as one, in input order (gathered on rank 0 in a job)."""
    if job is None:
        return _concatenate(parts)
    merged = _concatenate(parts) if parts else None  # a rank may have no sample at all
    gathered = distributed.gather(merged)  # first, so that every process decides on the same parts
    shaped = next(part for part in gathered if part is not None)
    is_tensors = isinstance(shaped, torch.Tensor) or (
        isinstance(shaped, dict) and all(isinstance(value, torch.Tensor) for value in shaped.values())
    )
    if not is_tensors:
        raise config_error(
            "In a torchrun job, outputs are gathered as a tensor or a dict of tensors only.",
            describe(shaped),
            "return a tensor from the model, or pick one output with output=.",
        )
    if not job.is_main_process and not all_ranks:
        return None
    if isinstance(shaped, dict):
        return {key: _interleaved([None if part is None else part[key] for part in gathered]) for key in shaped}
    return _interleaved(gathered)


def _interleaved(parts: list[torch.Tensor | None]) -> torch.Tensor:
    """Each process's rows (rank r holds positions r, r + N, ...) back in input order."""
    shaped = next(part for part in parts if part is not None)
    return distributed.interleave(_in_order([shaped[:0] if part is None else part for part in parts]))


def predict(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    all_ranks: bool = False,
    output: OutputChoice = None,
    callbacks: Callback | Sequence[Callback] = (),
    progress: Progress = "auto",
    returns: Decoded = "outputs",
    loss: str | LossFn | None = None,
    class_dim: int = 1,
) -> Any:
    """The model's outputs for every sample of ``data``, concatenated on the CPU in input order.

    Args:
        model: The model.
        data: Inputs alone (a tensor, array or dict; ``(inputs,)`` for a tuple of several inputs),
            or any kind ``fit`` accepts; targets, when present, are ignored.
        batch_size: Samples per batch for in-memory data and Datasets; chosen from the model by
            default, as in ``evaluate``.
        device: As in ``fit``.
        all_ranks: In a torchrun job, return the outputs on every process (by default only rank 0
            gets them; the others get None).
        output: One output to return (a key, a position, or a function of the outputs), as in
            ``fit``; by default everything the model returns but a ``loss`` and values that are
            not tensors.
        callbacks: ``trainwell.Callback`` objects (or one alone), given the evaluation hooks
            with ``run.phase == "predict"``: ``on_eval_start``, ``on_eval_batch_end`` after
            each batch (``run.outputs`` holds its outputs) and ``on_eval_end``; one that sets
            ``run.stop_training = True`` ends the pass after that batch.
        progress: As in ``evaluate``.
        returns: ``"outputs"`` as the model gives them; for a classifier ``"probabilities"``
            or ``"classes"`` (class indices; 0/1 per output for a binary loss), read through
            ``loss``: softmax for ``cross_entropy``, exp for ``nll``, sigmoid for
            ``bce_with_logits``, as they are for ``bce``.
        loss: The loss the classifier was trained with (needed for ``returns``).
        class_dim: Where ``returns`` finds the classes: dimension 1, as torch's losses take them
            ((N, C) or (N, C, H, W)), or -1 for outputs with classes last (a tagger's (N, T, C)).

    Returns:
        A tensor of shape (N, ...); a tuple or dict of such tensors when the model returns one
        (a dict of one tensor, such as a classifier's ``logits``, gives that tensor). After a
        stop, the outputs of the first samples, those predicted until then (under torchrun, up to
        the first sample a stopped process did not reach).

    Example:
        >>> import torch, trainwell
        >>> trainwell.predict(torch.nn.Linear(4, 3), torch.randn(10, 4)).shape
        torch.Size([10, 3])
    """
    _check_model(model)
    _check_batch_size(batch_size)
    listed = _pass_callbacks(callbacks, progress)
    spec = _decoding_loss(returns, loss)
    job = distributed.setup()
    target = _job_device(job, device)
    model.to(target)
    batches = _inference_batches(data, batch_size, job, target, model, inputs_only=True)
    display = _display(progress, job, own_pass=True)
    run = _inference_run(model, target, Tally([], has_loss=False), None, [*listed, *display], job)
    with out_of_memory_advice("predict", batches.batch_size, batches.num_samples), _closed_on_error(display, run):
        collected = loop.predict_loop(run, batches, for_predict if output is None else _chosen(output))
    outputs = _in_input_order(collected, job, all_ranks)
    if spec is None or outputs is None:
        return outputs
    if not isinstance(outputs, torch.Tensor):
        raise config_error(
            f"returns={returns!r} reads one tensor of class scores; the model returns several outputs.",
            describe(outputs),
            "pick the class scores with output= (e.g. output='logits').",
        )
    return decode(outputs, spec, returns, class_dim)


def _decoding_loss(returns: Any, loss: str | LossFn | None) -> LossSpec | None:
    """The loss through which predict reads a classifier's outputs (None: as they are)."""
    if returns not in get_args(Decoded):
        raise config_error(
            "returns must be 'outputs', 'probabilities' or 'classes'.",
            f"returns={returns!r}",
            "pass returns='probabilities' (or 'classes') with the classifier's loss, e.g. loss='cross_entropy'.",
        )
    if returns == "outputs":
        return None
    if loss is None:
        raise config_error(
            f"returns={returns!r} needs the loss the classifier was trained with: it says how to read the outputs.",
            "loss=None",
            f"pass e.g. loss='cross_entropy' (softmax) or loss='bce_with_logits' (sigmoid) with returns={returns!r}.",
        )
    spec = resolve_loss(loss)
    check_decodable(spec, returns)
    return spec


def _in_order(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each process's outputs (rank r holds positions r, r + N, ...) up to the first position
    missing, where a process stopped by a callback ended: the input's first samples, in order.
    Unchanged when every process went to its end."""
    world = len(parts)
    end = min(len(part) * world + rank for rank, part in enumerate(parts))
    return [part[: -(-(end - rank) // world)] for rank, part in enumerate(parts)]


def _chosen(output: OutputChoice) -> Callable[[Any], Any]:
    """The output ``predict`` keeps of each batch, resolved (and checked) on the first."""
    selectors: list[Selector] = []

    def keep(outputs: Any) -> Any:
        if not selectors:
            selectors.append(resolve_output(outputs, output))
        return selectors[0](outputs)

    return keep


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None:
        check_count("batch_size", batch_size)


def _inference_batches(
    data: Any,
    batch_size: int | None,
    job: distributed.Distributed | None,
    device: torch.device,
    model: nn.Module,
    inputs_only: bool = False,
    target_key: str | None = TARGET_KEY,
) -> Batches:
    """The batches of one pass (a generator is fine), each process reading only its own samples.
    Without a ``batch_size``, data that trainwell batches itself gets ``inference_batch_size``'s
    (the model must be on ``device``)."""
    batches = to_batches(data, batch_size=batch_size or INFERENCE_BATCH_RANGE[0], shuffle=False, seed=0,
                         device=device, dtype=float_dtype(model), one_pass=True, inputs_only=inputs_only,
                         target_key=target_key)  # fmt: skip
    planned = resizable(batches) if batch_size is None else None
    if planned is not None:
        probe = batches.sample(PROBE_SAMPLES)
        planned.resize(inference_batch_size(model, probe.inputs, probe.size, device))
    if job is not None:
        batches.lay_out(Layout(job.rank, job.world_size, lockstep=False))
    return batches


def _inference_run(
    model: nn.Module,
    device: torch.device,
    tally: Tally,
    objective: Objective | None,
    callbacks: Sequence[Callback] = (),
    job: distributed.Distributed | None = None,
) -> Run:
    return Run(
        model=model,
        module=model,
        optimizer=None,
        objective=objective,
        train_tally=Tally([], has_loss=False),
        val_tally=tally,
        precision=build_precision("fp32", device),
        device=device,
        callbacks=CallbackList(callbacks),
        is_main_process=job is None or job.is_main_process,
        rank=0 if job is None else job.rank,
        world_size=1 if job is None else job.world_size,
    )


def _say(notes: list[str], job: distributed.Distributed | None = None) -> None:
    """Repairs the input doctor made, shown once each as a ``TrainwellWarning`` (by rank 0 only)."""
    if job is not None and not job.is_main_process:
        return
    for note in notes:
        warn(note)


def _display(
    progress: FitProgress, job: distributed.Distributed | None = None, own_pass: bool = False
) -> list[Callback]:
    """The display (rank 0's only), last in the callbacks; ``own_pass``: for evaluate or predict."""
    if job is not None and not job.is_main_process:
        return []
    mode = (choose_pass_mode if own_pass else choose_mode)(progress, sys.stdout)
    return [] if mode is None else [ProgressDisplay(mode, chart=progress == "plot")]


@contextlib.contextmanager
def _closed_on_error(display: list[Callback], run: Run) -> Iterator[None]:
    """evaluate's and predict's display, closed if their pass raises (its bar would stay: a pass
    has no hook that always runs at its end, as ``on_fit_end`` is for fit)."""
    try:
        yield
    except BaseException:
        for shown in display:
            shown.on_fit_end(run)
        raise


def _listed(callbacks: Callback | Iterable[Callback]) -> list[Callback]:
    """``callbacks`` as a list: one alone is a list of one, as Keras and Lightning take it."""
    return list(callbacks) if isinstance(callbacks, Iterable) else [callbacks]


def _pass_callbacks(callbacks: Callback | Sequence[Callback], progress: Progress) -> list[Callback]:
    """evaluate's and predict's ``callbacks`` and ``progress``, checked before any work."""
    _check_choice("progress", progress, (True, False, "auto"))
    return CallbackList(_listed(callbacks)).callbacks  # refuses an entry that is not a Callback


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise config_error(
            f"Unknown device: {error}", f"device={device!r}", "pass 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'."
        ) from error
    if resolved.type == "meta":  # refused before the model moves: there it would lose its weights for good
        raise config_error(
            "The meta device holds shapes, not values: a model moved there loses its weights.",
            f"device={device!r}",
            "pass device='auto', 'cpu' or 'cuda' (the meta device builds models without memory; it cannot train).",
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise config_error(
            "CUDA is not available on this machine.", f"device={device!r}", "pass device='auto' or 'cpu'."
        )
    return resolved


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise config_error(
            "model must be a torch.nn.Module.",
            describe(model),
            "pass the module itself, e.g. fit(nn.Linear(4, 1), ...), not its outputs or a class.",
        )


def _compiled(model: nn.Module, compile: bool | str) -> nn.Module:
    """``model``, or ``torch.compile(model)`` in the chosen mode (``True``: torch's default)."""
    if compile is False:
        return model
    return cast(nn.Module, torch.compile(model, mode=None if compile is True else compile))


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if not any(value is choice if isinstance(choice, bool) else value == choice for choice in choices):
        raise config_error(f"Invalid {name}.", f"{name}={value!r}", f"use one of: {', '.join(map(repr, choices))}.")


def _concatenate(parts: list[Any]) -> Any:
    if not parts:
        raise data_error("predict got no batches.", "data with no samples", "pass at least one sample.")
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts).cpu()
    if isinstance(first, dict):
        return {key: _concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate(list(column)) for column in zip(*parts, strict=True))
    raise DataError(f"predict can only concatenate tensors; the model returned {describe(first)}.")
