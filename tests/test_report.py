"""The classification report against scikit-learn's own functions (within 1e-9: the same
counts divided in float64), printed, as JSON, and plotted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn import metrics as sk
from torch import nn

import trainwell as tw
from trainwell.report import Report

from conftest import blobs, make_mlp

TOLERANCE = 1e-9


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # scikit-learn's, on purpose
@pytest.mark.parametrize("seed", range(6))
def test_a_multiclass_report_equals_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes, samples = 4, int(rng.integers(5, 90))
    truth = rng.integers(0, 3, samples)  # class 3 never true: zero divisions
    scores = torch.tensor(rng.normal(size=(samples, classes)))
    report = Report.from_predictions(scores, torch.tensor(truth), class_names=["a", "b", "c", "d"])
    predicted = scores.argmax(1).numpy()
    assert report.confusion_matrix == sk.confusion_matrix(truth, predicted, labels=range(classes)).tolist()
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        truth, predicted, labels=range(classes), zero_division=0
    )
    for index, name in enumerate("abcd"):
        row = report.per_class[name]
        assert [row["precision"], row["recall"], row["f1"], row["support"]] == pytest.approx(
            [precision[index], recall[index], f1[index], support[index]], abs=TOLERANCE
        )
    for average in ("macro", "weighted"):
        expected = sk.precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        got = [report.overall[f"{kind}_{average}"] for kind in ("precision", "recall", "f1")]
        assert got == pytest.approx(expected[:3], abs=TOLERANCE), average
    assert report.overall["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted), abs=TOLERANCE)
    assert report.overall["balanced_accuracy"] == pytest.approx(
        sk.balanced_accuracy_score(truth, predicted), abs=TOLERANCE
    )
    assert report.roc is None and report.precision_recall is None


@pytest.mark.parametrize("seed", range(6))
def test_a_binary_report_has_the_curves_of_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    samples = 60
    truth = (rng.random(samples) < 0.4).astype(np.int64)
    truth[:2] = [0, 1]
    scores = np.round(rng.normal(size=samples) + truth, 1)  # ties at equal scores, as real scores have
    report = Report.from_predictions(torch.tensor(scores)[:, None], torch.tensor(truth, dtype=torch.float32))
    false_rate, true_rate, thresholds = sk.roc_curve(truth, scores, drop_intermediate=False)
    assert report.roc is not None and report.precision_recall is not None
    assert report.roc.x == pytest.approx(false_rate.tolist(), abs=TOLERANCE)
    assert report.roc.y == pytest.approx(true_rate.tolist(), abs=TOLERANCE)
    assert report.roc.thresholds[1:] == pytest.approx(thresholds[1:].tolist())
    assert report.overall["auroc"] == pytest.approx(sk.roc_auc_score(truth, scores), abs=TOLERANCE)
    assert report.overall["average_precision"] == pytest.approx(
        sk.average_precision_score(truth, scores), abs=TOLERANCE
    )
    precision, recall, _ = sk.precision_recall_curve(truth, scores)
    assert report.precision_recall.x == pytest.approx(recall[::-1][1:].tolist(), abs=TOLERANCE)
    assert report.precision_recall.y == pytest.approx(precision[::-1][1:].tolist(), abs=TOLERANCE)
    predicted = (scores > 0).astype(np.int64)
    assert report.confusion_matrix == sk.confusion_matrix(truth, predicted, labels=[0, 1]).tolist()


def test_the_report_of_a_trained_model_prints_converts_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need the plot extra")
    x, y = blobs()
    model = make_mlp()
    tw.fit(model, (x, y), loss="cross_entropy", epochs=3, progress=False, seed=0)
    report = tw.classification_report(model, (x, y), loss="cross_entropy", class_names=["red", "green", "blue"])
    values = tw.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy", "f1_macro", "balanced_accuracy"])
    assert report.overall["accuracy"] == pytest.approx(values["accuracy"], abs=1e-12)
    assert report.overall["f1_macro"] == pytest.approx(values["f1_macro"], abs=1e-12)
    assert report.overall["loss"] == pytest.approx(values["loss"], rel=1e-9)
    text = str(report)
    assert text.splitlines()[0].split() == ["precision", "recall", "f1-score", "support"]
    assert "red" in text and "macro avg" in text and "Confusion matrix" in text
    assert json.loads(report.to_json(tmp_path / "report.json")) == json.loads((tmp_path / "report.json").read_text())
    report.plot_confusion_matrix(tmp_path / "matrix.png")
    assert (tmp_path / "matrix.png").stat().st_size > 1000
    with pytest.raises(tw.ConfigError, match="curve of a yes/no problem"):
        report.plot_roc(tmp_path / "roc.png")


def test_a_tagger_report_leaves_out_the_padding(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (30, 7), generator=generator)
    tags = tokens % 3
    tags[:, 5:] = -100
    tagger = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))  # (N, T, C): classes last
    report = tw.classification_report(tagger, (tokens, tags), loss="cross_entropy")
    counted = tags != -100
    predicted = tagger(tokens).argmax(-1)[counted].numpy()
    assert sum(map(sum, report.confusion_matrix)) == int(counted.sum())
    assert report.confusion_matrix == sk.confusion_matrix(tags[counted].numpy(), predicted, labels=range(3)).tolist()


def test_evaluate_gives_back_the_scored_prediction_and_targets_in_input_order() -> None:
    x, y = blobs(samples=203)
    model = make_mlp()
    evaluation = tw.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy"], batch_size=16,
                             return_outputs=True)  # fmt: skip
    values, outputs, targets = evaluation  # unpacks like a tuple
    assert values == tw.evaluate(model, (x, y), loss="cross_entropy", metrics=["accuracy"], batch_size=16)
    assert torch.equal(targets, y)
    with torch.no_grad():
        assert torch.allclose(outputs, model(x), atol=1e-6)  # batches of 16 against one of 203: rounding only
    assert values["accuracy"] == pytest.approx((outputs.argmax(1) == y).double().mean().item(), abs=1e-12)


def test_evaluate_gives_back_each_heads_prediction_and_targets() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.label, self.box = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"label": self.label(inputs), "box": self.box(inputs)}

    x, y = blobs(samples=50)
    boxes = torch.randn(50, 2)
    _, outputs, targets = tw.evaluate(TwoHeads(), (x, {"label": y, "box": boxes}), batch_size=8,
                                      loss={"label": "cross_entropy", "box": "mse"}, return_outputs=True)  # fmt: skip
    assert set(outputs) == set(targets) == {"label", "box"}
    assert outputs["label"].shape == (50, 3) and torch.equal(targets["box"], boxes) and torch.equal(targets["label"], y)


@pytest.mark.parametrize(
    ("loss", "layer", "activation"),
    [
        ("cross_entropy", nn.Identity(), lambda scores: scores.softmax(1)),
        ("nll", nn.LogSoftmax(1), lambda scores: scores.softmax(1)),
        ("bce_with_logits", nn.Identity(), torch.sigmoid),
    ],
)
def test_predict_returns_probabilities_or_classes_through_the_loss(
    loss: str, layer: nn.Module, activation: Any
) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator)
    width = 1 if loss == "bce_with_logits" else 3
    torch.manual_seed(0)
    linear = nn.Linear(4, width)
    model = nn.Sequential(linear, layer)
    with torch.no_grad():
        scores = linear(x)
    probabilities = tw.predict(model, x, loss=loss, returns="probabilities")
    assert torch.allclose(probabilities, activation(scores), atol=1e-6)
    classes = tw.predict(model, x, loss=loss, returns="classes")
    expected = (scores > 0).long() if width == 1 else scores.argmax(1)
    assert torch.equal(classes, expected)


def test_predict_returns_is_checked_before_any_work() -> None:
    model = make_mlp()
    with pytest.raises(tw.ConfigError, match="needs the loss the classifier was trained with"):
        tw.predict(model, torch.randn(4, 4), returns="classes")
    with pytest.raises(tw.ConfigError, match="returns must be 'outputs', 'probabilities' or 'classes'"):
        tw.predict(model, torch.randn(4, 4), returns="labels", loss="cross_entropy")  # type: ignore[arg-type]
    with pytest.raises(tw.ConfigError, match="mse trains no classifier"):
        tw.predict(model, torch.randn(4, 4), returns="probabilities", loss="mse")


def test_predict_reads_classes_last_and_checks_the_loss_before_any_work() -> None:
    tagger = nn.Sequential(nn.Embedding(10, 3))  # (N, T, C): classes last
    tokens = torch.randint(0, 10, (6, 5))
    probabilities = tw.predict(tagger, tokens, loss="cross_entropy", returns="probabilities", class_dim=-1)
    assert torch.allclose(probabilities.sum(-1), torch.ones(6, 5))
    assert tw.predict(tagger, tokens, loss="cross_entropy", returns="classes", class_dim=-1).shape == (6, 5)

    class Untouchable(nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the model ran")

    with pytest.raises(tw.ConfigError, match="mse trains no classifier"):
        tw.predict(Untouchable(), torch.randn(4, 2), returns="classes", loss="mse")


def test_the_report_reads_dict_batches_labels_like_evaluate() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.linear(features)

    x, y = blobs(samples=40)
    batches = [{"features": x[start : start + 10], "labels": y[start : start + 10]} for start in range(0, 40, 10)]
    report = tw.classification_report(Keyword(), batches, loss="cross_entropy")
    assert sum(map(sum, report.confusion_matrix)) == 40
