"""find_lr, summary and safe weight files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import trainwell as tw

from conftest import blobs, make_mlp


def test_find_lr_suggests_a_rate_and_leaves_the_weights_untouched(tmp_path: Path) -> None:
    model = make_mlp()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = tw.find_lr(model, blobs(samples=600), loss="cross_entropy", steps=100, seed=0)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert 10 <= len(result.lrs) <= 100 and len(result.losses) == len(result.lrs)
    assert result.lrs == sorted(result.lrs) and result.lrs[0] == pytest.approx(1e-7)
    assert 1e-4 < result.suggestion < 10
    assert "falls fastest" in result.reason
    result.plot(tmp_path / "lr.png")
    with Image.open(tmp_path / "lr.png") as image:
        assert image.width > 400
    history = tw.fit(model, blobs(), loss="cross_entropy", lr=result.suggestion, epochs=3, progress=False, seed=0)
    assert history["loss"][-1] < history["loss"][0]


def test_find_lr_stops_when_the_loss_diverges() -> None:
    result = tw.find_lr(make_mlp(), blobs(samples=600), loss="cross_entropy", start_lr=1e-3, end_lr=1e6, steps=200)
    assert len(result.lrs) < 200  # stopped early
    with pytest.raises(tw.ConfigError, match="start_lr < end_lr"):
        tw.find_lr(make_mlp(), blobs(), loss="cross_entropy", start_lr=1.0, end_lr=0.1)


def test_summary_lists_layers_shapes_and_frozen_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    model[2][0].requires_grad_(False)
    model.train()
    result = tw.summary(model, torch.zeros(5, 4))
    assert [(row.name, row.kind, row.output_shape) for row in result.rows] == [
        ("0", "Linear", "(5, 8)"), ("1", "ReLU", "(5, 8)"), ("2.0", "Linear", "(5, 8)"), ("2.1", "Linear", "(5, 3)"),
    ]  # fmt: skip
    assert (result.total, result.trainable, result.frozen) == (40 + 72 + 27, 40 + 27, 72)
    text = str(result)
    assert "72 (frozen)" in text and "parameters: 139 (trainable 67, frozen 72)" in text
    assert model.training
    with pytest.raises(tw.DataError, match="failed on the example input"):
        tw.summary(model, torch.zeros(5, 7))


class Payload:
    """Unpickling this would create a file: the test that loading runs no code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.marker,))


def test_loading_a_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1), "evil": Payload(str(marker))}, path)
    with pytest.raises(tw.DataError, match="Refused to load") as raised:
        tw.load_weights(nn.Linear(1, 1), path)
    assert "mkdir" in str(raised.value)
    assert not marker.exists()
    with path.open("wb") as file:
        pickle.dump(Payload(str(marker)), file)
    with pytest.raises(tw.DataError, match="Refused to load"):
        tw.load_weights(nn.Linear(1, 1), path)
    assert not marker.exists()


def test_weights_for_another_architecture_are_explained(tmp_path: Path) -> None:
    path = tw.save_weights(make_mlp(), tmp_path / "w.pt")
    with pytest.raises(tw.DataError, match="do not fit this model"):
        tw.load_weights(make_mlp(hidden=5), path)
    with pytest.raises(tw.DataError, match="No such file"):
        tw.load_weights(make_mlp(), tmp_path / "missing.pt")
