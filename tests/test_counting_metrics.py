"""Precision, recall, F1, IoU, Dice and balanced accuracy from trainwell's confusion-matrix
sums, against scikit-learn's own functions on random label sets (absent classes, zero
divisions, ignored positions, any split into batches): equal within 1e-9 (float64 division
of the same integer counts; 1e-6 is the issue's bound)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch import nn

import trainwell as tw

AVERAGED = ("precision", "recall", "f1", "iou", "dice")
TOLERANCE = 1e-9


class Fixed(nn.Module):
    """Returns the stored scores of the samples whose indices it is given."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scores", scores)
        self.unused = nn.Parameter(torch.zeros(()))  # evaluate needs no parameter; fit would

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.scores[index.long().reshape(-1)]


def reference(kind: str, average: str | None, truth: np.ndarray, predicted: np.ndarray, binary: bool) -> Any:
    """scikit-learn's value, with trainwell's default average (binary for one output, else macro)."""
    average = average or ("binary" if binary else "macro")
    sk_average = None if average == "per_class" else average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "iou":
            return sk.jaccard_score(truth, predicted, average=sk_average, zero_division=0)
        if kind == "balanced_accuracy":
            return sk.balanced_accuracy_score(truth, predicted)
        precision, recall, f1, _ = sk.precision_recall_fscore_support(
            truth, predicted, average=sk_average, zero_division=0
        )
        return {"precision": precision, "recall": recall, "f1": f1, "dice": f1}[kind]


def names_for(labels: bool) -> list[str]:
    names = [f"{kind}{suffix}" for kind in AVERAGED for suffix in ("", "_micro", "_macro", "_weighted", "_per_class")]
    return names if labels else [*names, "balanced_accuracy"]


def check(
    results: dict[str, float], truth: np.ndarray, predicted: np.ndarray, labels: bool, width: int, binary: bool = False
) -> None:
    for name in names_for(labels):
        kind, _, average = name.partition("_") if name != "balanced_accuracy" else (name, "", "")
        expected = reference(kind, average or None, truth, predicted, binary)
        if average == "per_class":  # every class of the outputs, absent ones 0 (scikit-learn lists present ones)
            present = np.unique(np.concatenate([truth, predicted])) if not labels else np.arange(width)
            got = {int(key.rsplit("_", 1)[1]): value for key, value in results.items() if key.startswith(f"{kind}_")
                   and key.rsplit("_", 1)[1].isdigit()}  # fmt: skip
            assert sorted(got) == list(range(width)), name
            for index, value in zip(present, np.atleast_1d(expected), strict=True):
                assert got[int(index)] == pytest.approx(value, abs=TOLERANCE), (name, index)
            assert all(got[index] == 0 for index in set(range(width)) - set(present.tolist())), name
        else:
            assert results[name] == pytest.approx(expected, abs=TOLERANCE), name


@pytest.mark.parametrize("seed", range(24))
def test_multiclass_values_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes, samples = int(rng.integers(2, 7)), int(rng.integers(1, 80))
    seen = rng.choice(classes, size=int(rng.integers(1, classes + 1)), replace=False)  # some classes absent
    truth = rng.choice(seen, size=samples)
    scores = torch.tensor(rng.normal(size=(samples, classes)), dtype=torch.float32)
    scores[:, rng.integers(classes)] -= 10 * float(rng.integers(0, 2))  # sometimes a class never predicted
    ignored = rng.random(samples) < (0.2 if seed % 2 else 0.0)
    if ignored.all():
        ignored[0] = False
    targets = torch.tensor(np.where(ignored, -100, truth))
    results = tw.evaluate(Fixed(scores), (torch.arange(samples), targets), loss="cross_entropy",
                          metrics=names_for(False), batch_size=int(rng.integers(1, 40)))  # fmt: skip
    predicted = scores.argmax(1).numpy()
    check(results, truth[~ignored], predicted[~ignored], labels=False, width=classes)


@pytest.mark.parametrize("seed", range(16))
def test_binary_values_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    samples = int(rng.integers(1, 80))
    truth = (rng.random(samples) < rng.choice([0.0, 0.3, 1.0])).astype(np.int64)  # sometimes one class only
    scores = torch.tensor(rng.normal(size=(samples, 1)) + rng.choice([-5.0, 0.0, 5.0]), dtype=torch.float32)
    results = tw.evaluate(Fixed(scores), (torch.arange(samples), torch.tensor(truth, dtype=torch.float32)[:, None]),
                          loss="bce_with_logits", metrics=names_for(False), batch_size=int(rng.integers(1, 40)))  # fmt: skip
    predicted = (scores[:, 0] > 0).long().numpy()
    check(results, truth, predicted, labels=False, width=2, binary=True)


@pytest.mark.parametrize("seed", range(16))
def test_multilabel_values_equal_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    width, samples = int(rng.integers(2, 6)), int(rng.integers(1, 80))
    truth = (rng.random((samples, width)) < rng.random(width)).astype(np.int64)
    truth[:, 0] = 0  # a label that never occurs: zero divisions
    scores = torch.tensor(rng.normal(size=(samples, width)), dtype=torch.float32)
    results = tw.evaluate(Fixed(scores), (torch.arange(samples), torch.tensor(truth, dtype=torch.float32)),
                          loss="bce_with_logits", metrics=names_for(True), batch_size=int(rng.integers(1, 40)))  # fmt: skip
    check(results, truth, (scores > 0).long().numpy(), labels=True, width=width)


def test_segmentation_with_void_pixels_equals_scikit_learn_on_the_counted_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 4, 5, 7, generator=generator)  # (N, C, H, W)
    masks = torch.randint(0, 4, (6, 5, 7), generator=generator)
    masks[:, 0, :] = 255  # a void row
    results = tw.evaluate(Fixed(scores.flatten(1)), (torch.arange(6), masks), batch_size=4,
                          loss=nn.CrossEntropyLoss(ignore_index=255), output=lambda flat: flat.view(-1, 4, 5, 7),
                          metrics=["iou", "dice", "iou_per_class", "balanced_accuracy"])  # fmt: skip
    counted = masks != 255
    truth, predicted = masks[counted].numpy(), scores.argmax(1)[counted].numpy()
    assert results["iou"] == pytest.approx(sk.jaccard_score(truth, predicted, average="macro"), abs=TOLERANCE)
    assert results["dice"] == pytest.approx(sk.f1_score(truth, predicted, average="macro"), abs=TOLERANCE)
    assert results["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(truth, predicted), abs=TOLERANCE)
    per_class = sk.jaccard_score(truth, predicted, average=None)
    assert [results[f"iou_{index}"] for index in range(4)] == pytest.approx(per_class, abs=TOLERANCE)


def ranking_reference(kind: str, truth: np.ndarray, scores: np.ndarray, multiclass: bool, average: str) -> Any:
    if kind == "auroc":
        if multiclass:
            return sk.roc_auc_score(truth, scores, multi_class="ovr", average=average)
        return sk.roc_auc_score(truth, scores, average=average)
    if multiclass:
        truth = np.eye(scores.shape[1])[truth]
    return sk.average_precision_score(truth, scores, average=average)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
@pytest.mark.parametrize("seed", range(3))
def test_ranking_metrics_equal_scikit_learn(task: str, seed: int) -> None:
    pytest.importorskip("torchmetrics", reason="auroc and average_precision need the metrics extra")
    rng = np.random.default_rng(300 + seed)
    samples, width = 120, {"binary": 1, "multiclass": 4, "multilabel": 3}[task]
    scores = torch.tensor(rng.normal(size=(samples, width)), dtype=torch.float32)
    if task == "multiclass":
        truth = np.arange(samples) % width  # every class present (scikit-learn's one-vs-rest needs them)
        targets, loss = torch.tensor(truth), "cross_entropy"
        probabilities = torch.softmax(scores, 1).numpy()
    else:
        truth = (rng.random((samples, width)) < 0.4).astype(np.int64)
        truth[:2], truth[2:4] = 0, 1  # both outcomes for every label
        targets, loss = torch.tensor(truth, dtype=torch.float32), "bce_with_logits"
        probabilities = scores.numpy()  # rankings are the same on logits
    names = ["auroc", "average_precision"] + (
        [] if task == "binary" else ["auroc_weighted", "average_precision_per_class"]
    )
    results = tw.evaluate(Fixed(scores), (torch.arange(samples), targets), loss=loss, metrics=names, batch_size=25)
    flat = probabilities[:, 0] if task == "binary" else probabilities
    truth_flat = truth[:, 0] if task == "binary" else truth
    # torchmetrics computes in float32: 1e-6 (the bound) holds; float64 scikit-learn is the reference.
    for kind in ("auroc", "average_precision"):
        expected = ranking_reference(kind, truth_flat, flat, task == "multiclass", "macro")
        assert results[kind] == pytest.approx(expected, abs=1e-6), kind
    if task != "binary":
        weighted = ranking_reference("auroc", truth_flat, flat, task == "multiclass", "weighted")
        assert results["auroc_weighted"] == pytest.approx(weighted, abs=1e-6)
        per_class = ranking_reference("average_precision", truth_flat, flat, task == "multiclass", None)
        got = [results[f"average_precision_{index}"] for index in range(width)]
        assert got == pytest.approx(per_class, abs=1e-6)


def test_ranking_metrics_without_torchmetrics_name_the_extra(tmp_path: Path) -> None:
    # torchmetrics is installed here: a subprocess makes its import fail, as on a machine without it.
    script = (
        "import sys; sys.modules['torchmetrics'] = None\n"
        "import torch, trainwell as tw\n"
        "try:\n"
        "    tw.evaluate(torch.nn.Linear(2, 3), (torch.randn(8, 2), torch.arange(8) % 3), loss='cross_entropy',"
        " metrics=['auroc'])\n"
        "except tw.ConfigError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert "The auroc metric is computed by torchmetrics, which is not installed." in result.stdout
    assert "pip install 'trainwell[metrics]'" in result.stdout


def test_a_metric_returning_named_values_logs_each_as_a_sample_weighted_mean() -> None:
    def agreement(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        predicted = outputs.argmax(1)
        return {"hits": (predicted == targets).float().mean(), "zeros": (predicted == 0).float().mean()}

    generator = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(50, 3, generator=generator), torch.randint(0, 3, (50,), generator=generator)
    results = tw.evaluate(Fixed(scores), (torch.arange(50), targets), loss="cross_entropy", batch_size=16,
                          metrics=[agreement, "accuracy"])  # fmt: skip
    predicted = scores.argmax(1)
    assert results["hits"] == pytest.approx((predicted == targets).double().mean().item(), abs=1e-12)
    assert results["hits"] == pytest.approx(results["accuracy"], abs=1e-12)
    assert results["zeros"] == pytest.approx((predicted == 0).double().mean().item(), abs=1e-12)
    history = tw.fit(nn.Linear(3, 3), (scores, targets), loss="cross_entropy", metrics=[agreement], epochs=2,
                     val_split=0.2, progress=False)  # fmt: skip
    assert {"hits", "zeros", "val_hits", "val_zeros"} <= set(history)

    def unsteady(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"part{len(targets)}": outputs.mean()}

    with pytest.raises(tw.ConfigError, match="must give the same named numbers for every batch"):
        tw.evaluate(Fixed(scores), (torch.arange(50), targets), loss="cross_entropy", batch_size=16,
                    metrics=[unsteady])  # fmt: skip


def test_monitors_may_name_a_per_class_value_or_a_dict_metrics_key() -> None:
    def agreement(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hits": (outputs.argmax(1) == targets).float().mean()}

    x, y = torch.randn(60, 3), torch.arange(60) % 3
    for metric, monitor in (("f1_per_class", "val_f1_2"), (agreement, "val_hits")):
        stopper = tw.EarlyStopping(monitor=monitor, patience=1, mode="auto" if metric == "f1_per_class" else "max")
        history = tw.fit(nn.Linear(3, 3), (x, y), loss="cross_entropy", metrics=[metric], val_split=0.2, epochs=2,
                         callbacks=[stopper], progress=False)  # fmt: skip
        assert monitor in history and stopper.tracker.mode == "max"
    with pytest.raises(tw.ConfigError, match="The monitored value 'val_f1_7' is not logged"):
        tw.fit(nn.Linear(3, 3), (x, y), loss="cross_entropy", metrics=["f1_per_class"], val_split=0.2,
               callbacks=[tw.EarlyStopping(monitor="val_f1_7")], progress=False)  # fmt: skip


@pytest.mark.parametrize("task", ["multiclass", "ignored", "binary", "multilabel"])
def test_accuracy_beside_counting_metrics_reads_their_matrix_and_equals_accuracy_alone(task: str) -> None:
    generator = torch.Generator().manual_seed(1)
    width = {"multiclass": 4, "ignored": 4, "binary": 1, "multilabel": 3}[task]
    scores = torch.randn(90, width, generator=generator)
    if task in ("multiclass", "ignored"):
        targets, loss = torch.randint(0, 4, (90,), generator=generator), "cross_entropy"
        if task == "ignored":
            targets[::7] = -100
    else:
        targets, loss = (torch.rand(90, width, generator=generator) > 0.5).float(), "bce_with_logits"
    data = (torch.arange(90), targets)
    alone = tw.evaluate(Fixed(scores), data, loss=loss, metrics=["accuracy"], batch_size=16)
    shared = tw.evaluate(Fixed(scores), data, loss=loss, metrics=["accuracy", "f1_macro", "precision"], batch_size=16)
    assert shared["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-12)


def test_a_metrics_dict_names_the_metrics_of_a_model_that_returns_one_tensor() -> None:
    pytest.importorskip("torchmetrics", reason="a torchmetrics object is the case the name is for")
    from torchmetrics.classification import MulticlassF1Score

    x, y = torch.randn(80, 3), torch.arange(80) % 3
    named = {"my_f1": MulticlassF1Score(num_classes=3, average="macro"), "mine": "f1_macro", "hits": "accuracy"}
    values = tw.evaluate(nn.Linear(3, 3), (x, y), loss="cross_entropy", metrics=named)
    assert sorted(values) == ["hits", "loss", "mine", "my_f1"]
    assert values["my_f1"] == pytest.approx(values["mine"], abs=1e-6)  # torchmetrics and trainwell agree
    stopper = tw.EarlyStopping(monitor="val_mine", patience=1, mode="max")  # a name of one's own: say the direction
    history = tw.fit(nn.Linear(3, 3), (x, y), loss="cross_entropy", metrics=named, val_split=0.25, epochs=2,
                     callbacks=[stopper], progress=False)  # fmt: skip
    assert {"my_f1", "val_my_f1", "mine", "val_mine"} <= set(history) and stopper.tracker.mode == "max"


def test_review_fixes_dict_metric_clash_ranking_scales_and_a_shifted_language_model() -> None:
    # A metric function's dict may not take another value's name (it replaced the loss).
    def clash(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": outputs.mean()}

    x, y = torch.randn(40, 3), torch.arange(40) % 3
    with pytest.raises(tw.ConfigError, match="logs 'loss', which is already another value's name"):
        tw.evaluate(nn.Linear(3, 3), (x, y), loss="cross_entropy", metrics=[clash])
    # Logits of a last batch that all fall in [0, 1] are read on the same scale as the others.
    pytest.importorskip("torchmetrics", reason="auroc needs the metrics extra")
    scores = torch.tensor([[-3.0], [2.0], [-1.0], [4.0], [0.2], [0.9]])
    truth = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    values = tw.evaluate(Fixed(scores), (torch.arange(6), truth), loss="bce_with_logits", metrics=["auroc"],
                         batch_size=4)  # fmt: skip
    assert values["auroc"] == pytest.approx(sk.roc_auc_score(truth[:, 0].numpy(), scores[:, 0].numpy()), abs=1e-6)


class ShiftedLM(nn.Module):
    """A causal language model computing its own loss, position t against label t + 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 11)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.embed(input_ids)
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return result


def test_evaluate_gives_back_a_shifted_models_prediction_paired_as_its_metrics_read_it() -> None:
    ids = torch.randint(0, 11, (24, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[start : start + 8], "labels": ids[start : start + 8]} for start in (0, 8, 16)]
    values, outputs, targets = tw.evaluate(ShiftedLM(), batches, metrics=["accuracy"], return_outputs=True)
    assert outputs.shape == (24, 5, 11) and torch.equal(targets, ids[:, 1:])
    assert values["accuracy"] == pytest.approx((outputs.argmax(-1) == targets).double().mean().item(), abs=1e-12)
