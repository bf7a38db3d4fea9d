"""The models people have: structured outputs (tuples, dicts, Hugging Face's ModelOutput), several
heads, models that compute their own loss, per-token and per-pixel labels with ignored positions.

Each case is checked against a hand-written loop or a hand computation on the same seed.
Tolerances: 1e-6 on weights and losses where the summation order differs from the reference
(float32 rounding), exact where it cannot.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, IterableDataset

import trainwell as tw

from conftest import blobs, without_time

transformers = pytest.importorskip("transformers")


def bert(labels: int = 3, token_classes: bool = False) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    if token_classes:
        return transformers.BertForTokenClassification(config)
    return transformers.BertForSequenceClassification(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                     eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def padded(
    samples: int = 24, length: int = 9, vocabulary: int = 40, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with 0-padding after a random length (>= 2), and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocabulary, (samples, length), generator=generator)
    lengths = torch.randint(2, length + 1, (samples, 1), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths).long()
    return ids * mask, mask


def hand_loop(
    model: nn.Module,
    batches: Iterable[Any],
    loss_of: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
    epochs: int = 1,
    lr: float = 0.01,
) -> list[float]:
    """SGD as anyone writes it; returns each epoch's loss averaged over what ``loss_of`` counts."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    means = []
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches:
            loss, counted = loss_of(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + float(loss) * counted, count + counted
        means.append(total / count)
    return means


def same_weights(model: nn.Module, reference: nn.Module, atol: float = 1e-6) -> bool:
    return all(
        torch.allclose(ours, theirs, atol=atol)
        for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def chunks(data: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    total = len(next(iter(data.values())))
    return [{key: value[start : start + size] for key, value in data.items()} for start in range(0, total, size)]


# --- Hugging Face models ------------------------------------------------------------------------


def test_a_bert_classifier_trains_on_its_own_loss_from_dict_batches_as_the_hf_course_writes_them() -> None:
    ids, mask = padded()
    labels = torch.arange(24) % 3
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model, reference = bert(), bert()
    with pytest.warns(
        tw.TrainwellWarning, match=r"training on its own loss \(outputs\['loss'\]\); metrics read outputs\['logits'\]"
    ):
        history = tw.fit(model, data, metrics=["accuracy"], epochs=2, batch_size=8, shuffle=False, progress=False)
    expected = hand_loop(reference, chunks(data, 8), lambda m, batch: (m(**batch).loss, 8), epochs=2)
    assert history["loss"] == pytest.approx(expected, abs=1e-6)
    assert same_weights(model, reference)
    assert 0 <= history["accuracy"][-1] <= 1
    predicted = tw.predict(model, {"input_ids": ids, "attention_mask": mask})
    assert isinstance(predicted, torch.Tensor) and predicted.shape == (24, 3)  # the logits: no loss, no None
    evaluated = tw.evaluate(model, data, metrics=["accuracy"])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert evaluated["loss"] == pytest.approx(float(functional.cross_entropy(logits, labels)), abs=1e-6)
    assert evaluated["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))

    def agreement(outputs: Any, targets: torch.Tensor) -> torch.Tensor:  # reads the ModelOutput's attribute
        return (outputs.logits.argmax(1) == targets).float().mean()

    structured = tw.evaluate(model, data, metrics=[tw.structured(agreement)])
    assert structured["agreement"] == pytest.approx(evaluated["accuracy"])


def test_return_dict_false_gives_loss_and_logits_as_a_tuple_which_is_read_the_same_way() -> None:
    ids, mask = padded()
    labels = torch.arange(24) % 3
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model, reference = bert(), bert()
    model.config.return_dict = False
    assert isinstance(model(**chunks(data, 8)[0]), tuple)
    with pytest.warns(
        tw.TrainwellWarning, match=r"training on its own loss \(outputs\[0\]\); metrics read outputs\[1\]"
    ):
        history = tw.fit(model, data, metrics=["accuracy"], batch_size=8, shuffle=False, progress=False)
    expected = hand_loop(reference, chunks(data, 8), lambda m, batch: (m(**batch).loss, 8))
    assert history["loss"] == pytest.approx(expected, abs=1e-6)
    assert same_weights(model, reference)


def test_a_bert_classifier_with_inputs_and_labels_and_a_named_loss() -> None:
    ids, mask = padded()
    labels = torch.arange(24) % 3
    model, reference = bert(), bert()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with pytest.warns(tw.TrainwellWarning, match=r"the loss and metrics read outputs\['logits'\]"):
        history = tw.fit(model, (inputs, labels), loss="cross_entropy", metrics=["accuracy"], batch_size=8,
                         shuffle=False, progress=False)  # fmt: skip
    batches = [({k: v[i : i + 8] for k, v in inputs.items()}, labels[i : i + 8]) for i in range(0, 24, 8)]
    expected = hand_loop(reference, batches, lambda m, b: (functional.cross_entropy(m(**b[0]).logits, b[1]), 8))
    assert history["loss"] == pytest.approx(expected, abs=1e-6)
    assert same_weights(model, reference)


def word_tokenizer() -> Any:
    """A word-level tokenizer built locally (no download): the HF course's collate needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", *["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "fast", "slow", "big", "small"]]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_data_collator_with_padding_batches_train_like_a_hand_loop() -> None:
    tokenizer = word_tokenizer()
    sentences = ["the cat sat", "a dog ran fast on the mat", "the big cat", "a small dog sat on a mat", "cat ran",
                 "the slow dog ran on the big mat", "a cat", "dog sat on the mat"] * 2  # fmt: skip
    features = [dict(tokenizer(text), labels=index % 2) for index, text in enumerate(sentences)]
    collate = transformers.DataCollatorWithPadding(tokenizer)
    loader = DataLoader(features, batch_size=4, collate_fn=collate)  # BatchEncoding batches: Mappings, not dicts
    model, reference = bert(labels=2), bert(labels=2)
    with pytest.warns(tw.TrainwellWarning):
        history = tw.fit(model, loader, metrics=["accuracy"], epochs=2, shuffle=False, progress=False)
    expected = hand_loop(reference, loader, lambda m, batch: (m(**batch).loss, len(batch["labels"])), epochs=2)
    assert history["loss"] == pytest.approx(expected, abs=1e-6)
    assert same_weights(model, reference)


def test_a_gpt2_language_model_on_shifted_targets_averages_over_the_counted_tokens() -> None:
    ids, mask = padded(samples=12, vocabulary=30)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)  # next token; padding ignored
    model, reference = gpt2(), gpt2()
    inputs = {"input_ids": ids, "attention_mask": mask}
    history = tw.fit(model, (inputs, targets), loss="cross_entropy", batch_size=4, shuffle=False, output="logits",
                     progress=False)  # fmt: skip

    def token_sum(m: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        logits = m(**batch[0]).logits
        counted = int((batch[1] != -100).sum())
        return functional.cross_entropy(logits.reshape(-1, 30), batch[1].reshape(-1)), counted

    batches = [({k: v[i : i + 4] for k, v in inputs.items()}, targets[i : i + 4]) for i in range(0, 12, 4)]
    expected = hand_loop(reference, batches, token_sum)  # the epoch's token mean
    assert history["loss"] == pytest.approx(expected, abs=1e-6)
    assert same_weights(model, reference)
    result = tw.evaluate(model, (inputs, targets), loss="cross_entropy", output="logits")
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert result["loss"] == pytest.approx(
        float(functional.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1))), abs=1e-6
    )


def test_a_token_classifier_s_own_loss_is_averaged_over_its_counted_tokens() -> None:
    ids, mask = padded(samples=16)
    tags = torch.where(mask.bool(), ids % 4, -100)
    model = bert(labels=4, token_classes=True)
    data = {"input_ids": ids, "attention_mask": mask, "labels": tags}
    with pytest.warns(tw.TrainwellWarning):
        result = tw.evaluate(model, data, metrics=["accuracy"], batch_size=3)  # batches of unequal token counts
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    counted = tags != -100
    assert result["loss"] == pytest.approx(
        float(functional.cross_entropy(logits.reshape(-1, 4), tags.reshape(-1))), abs=1e-6
    )
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1)[counted] == tags[counted]).float().mean()))


# --- per-token and per-pixel labels ----------------------------------------------------------


class Tagger(nn.Module):
    """An LSTM tagger as in the PyTorch tutorial: outputs (N, T, C)."""

    def __init__(self, vocabulary: int = 40, classes: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.out = nn.Linear(8, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(ids))
        return self.out(hidden)


def tagged(samples: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = padded(samples=samples)
    return ids, torch.where(mask.bool(), ids % 5, -100)


def test_a_tagger_with_padding_reports_the_token_mean_loss_and_accuracy() -> None:
    ids, tags = tagged()
    torch.manual_seed(0)
    model = Tagger()
    history = tw.fit(model, (ids, tags), loss=nn.CrossEntropyLoss(), metrics=["accuracy", "top2_accuracy"],
                     batch_size=8, progress=False, seed=0)  # fmt: skip
    assert history.epochs == 1
    result = tw.evaluate(model, (ids, tags), loss="cross_entropy", metrics=["accuracy", "top2_accuracy"], batch_size=5)
    model.eval()
    with torch.no_grad():
        outputs = model(ids)
    counted = tags != -100
    assert result["loss"] == pytest.approx(
        float(functional.cross_entropy(outputs.reshape(-1, 5), tags.reshape(-1))), abs=1e-6
    )
    assert result["accuracy"] == pytest.approx(float((outputs.argmax(-1)[counted] == tags[counted]).float().mean()))
    top2 = (outputs.topk(2, dim=-1).indices == tags.unsqueeze(-1)).any(-1)
    assert result["top2_accuracy"] == pytest.approx(float(top2[counted].float().mean()))


def test_a_pad_tag_ignored_by_the_loss_is_ignored_by_accuracy_too() -> None:
    """The issue's case: tag 0 is padding and ``ignore_index=0``; a model right on every real tag
    scores 1.0 (it reported 0.631 when padding counted)."""
    ids, mask = padded(samples=16)
    tags = torch.where(mask.bool(), 1 + ids % 3, 0)

    class Perfect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return functional.one_hot(1 + ids % 3, 4).float() * 10 * self.scale  # wrong on padding: says 1

    result = tw.evaluate(Perfect(), (ids, tags), loss=nn.CrossEntropyLoss(ignore_index=0), metrics=["accuracy"])
    assert result["accuracy"] == 1.0


@pytest.mark.parametrize("weighted", [False, True])
def test_accumulated_padded_batches_update_exactly_as_one_big_batch(weighted: bool) -> None:
    ids, tags = tagged()
    torch.manual_seed(0)
    accumulated = Tagger()
    big = copy.deepcopy(accumulated)
    loss: Any = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])) if weighted else "cross_entropy"
    small = tw.fit(accumulated, (ids, tags), loss=loss, batch_size=8, grad_accum_steps=2, epochs=2,
                   shuffle=False, lr=0.5, progress=False)  # fmt: skip
    large = tw.fit(big, (ids, tags), loss=loss, batch_size=16, epochs=2, shuffle=False, lr=0.5, progress=False)
    assert same_weights(accumulated, big, atol=1e-6)  # per-sample weighting was off by 0.09
    assert small["loss"] == pytest.approx(large["loss"], abs=1e-6)  # both: the epoch's (weighted) token mean
    if weighted:  # a weighted mean: each token counts by its class's weight, as in torch
        result = tw.evaluate(big, (ids, tags), loss=loss, batch_size=5)
        with torch.no_grad():
            expected = loss(big(ids).reshape(-1, 5), tags.reshape(-1))
        assert result["loss"] == pytest.approx(float(expected), abs=1e-6)


def test_segmentation_with_void_pixels() -> None:
    torch.manual_seed(0)
    images = torch.randn(12, 3, 6, 6)
    masks = torch.randint(0, 4, (12, 6, 6))
    masks[:, :2, :] = 255  # void
    model = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(tw.DataError, match=r"If 255 marks positions to skip") as error:
        tw.fit(copy.deepcopy(model), (images, masks), loss="cross_entropy", progress=False)
    assert "nn.CrossEntropyLoss(ignore_index=255)" in str(error.value)
    loss = nn.CrossEntropyLoss(ignore_index=255)
    result = tw.evaluate(model, (images, masks), loss=loss, metrics=["accuracy"], batch_size=5)
    with torch.no_grad():
        outputs = model(images)
    counted = masks != 255
    assert result["loss"] == pytest.approx(float(loss(outputs, masks)), abs=1e-6)
    assert result["accuracy"] == pytest.approx(float((outputs.argmax(1)[counted] == masks[counted]).float().mean()))


def test_when_the_layout_is_ambiguous_torch_s_is_taken_and_the_warning_says_how_to_choose() -> None:
    x = torch.randint(0, 4, (8, 4))
    with pytest.warns(
        tw.TrainwellWarning,
        match=r"could hold the classes in dimension 1 .* output=lambda outputs: outputs\.movedim\(-1, 1\)",
    ):
        tw.evaluate(nn.Embedding(4, 4), (x, x), loss="cross_entropy")  # outputs (8, 4, 4) against (8, 4)


# --- several outputs, several targets -------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.label, self.box = nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.body(x))
        return {"label": self.label(hidden), "box": self.box(hidden)}


def test_two_heads_with_dict_targets_weights_and_per_head_metrics() -> None:
    x, y = blobs(samples=48)
    boxes = x[:, :2] * 0.5
    model, reference = TwoHeads(), TwoHeads()
    history = tw.fit(model, (x, {"label": y, "box": boxes}), loss={"label": "cross_entropy", "box": "mse"},
                     loss_weights={"box": 0.5}, metrics={"label": ["accuracy"], "box": ["mae"]}, batch_size=16,
                     shuffle=False, val=(x, {"label": y, "box": boxes}), epochs=2, progress=False)  # fmt: skip
    assert set(without_time(history)) == {"loss", "loss_label", "loss_box", "label_accuracy", "box_mae", "val_loss",
                                          "val_loss_label", "val_loss_box", "val_label_accuracy", "val_box_mae"}  # fmt: skip

    def total(m: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        outputs = m(batch[0])
        return functional.cross_entropy(outputs["label"], batch[1]) + 0.5 * functional.mse_loss(
            outputs["box"], batch[2]
        ), 16

    batches = [(x[i : i + 16], y[i : i + 16], boxes[i : i + 16]) for i in range(0, 48, 16)]
    assert history["loss"] == pytest.approx(hand_loop(reference, batches, total, epochs=2), abs=1e-6)
    assert same_weights(model, reference)
    with torch.no_grad():
        outputs = model(x)
    assert history["val_loss_box"][-1] == pytest.approx(float(functional.mse_loss(outputs["box"], boxes)), abs=1e-6)
    assert history["val_label_accuracy"][-1] == pytest.approx(float((outputs["label"].argmax(1) == y).float().mean()))
    predicted = tw.predict(model, x)
    assert set(predicted) == {"label", "box"} and predicted["box"].shape == (48, 2)
    assert tw.predict(model, x, output="box").shape == (48, 2)


def test_a_model_returning_logits_and_an_auxiliary_output() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.linear(x)
            return logits, logits.square().mean(1)

    def agreement(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).float().mean()

    x, y = blobs(samples=40)
    model = WithAux()
    with pytest.warns(tw.TrainwellWarning, match=r"read outputs\[0\]"):
        history = tw.fit(model, (x, y), loss="cross_entropy", metrics=["accuracy", agreement], progress=False, seed=0)
    assert history["accuracy"] == history["agreement"]

    def with_aux(outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits, aux = outputs
        return functional.cross_entropy(logits, targets) + 0.01 * aux.mean()

    model, reference = WithAux(), WithAux()
    history = tw.fit(model, (x, y), loss=tw.structured(with_aux), metrics=["accuracy"], batch_size=8, shuffle=False,
                     progress=False)  # fmt: skip
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    assert history["loss"] == pytest.approx(
        hand_loop(reference, batches, lambda m, b: (with_aux(m(b[0]), b[1]), 8)), abs=1e-6
    )
    assert isinstance(tw.predict(model, x), tuple)  # a tuple stays a tuple


# --- every mistake before the first step ----------------------------------------------------


class Features(nn.Module):
    """A model whose forward takes one keyword, ``features``: for dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def untouched(model: nn.Module, call: Callable[[], Any], error: type[Exception], match: str) -> None:
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        call()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_each_mistake_is_named_before_any_weight_changes() -> None:
    x, y = blobs(samples=32)
    model = TwoHeads()
    heads = (x, {"label": y, "box": x[:, :2]})
    untouched(model, lambda: tw.fit(model, heads, loss={"label": "cross_entropy", "size": "mse"}, progress=False),
              tw.DataError, r"names the output head 'size'.*\n.*dict with label \(8, 3\), box \(8, 2\)")  # fmt: skip
    untouched(model, lambda: tw.fit(model, heads, loss="cross_entropy", output="score", progress=False),
              tw.ConfigError, r"output='score' names nothing.*\n.*label \(8, 3\), box \(8, 2\)")  # fmt: skip
    untouched(model, lambda: tw.fit(model, heads, loss="cross_entropy", output=1.5), tw.ConfigError,
              "output must name one of the model's outputs")  # fmt: skip
    untouched(model, lambda: tw.fit(model, heads, loss="cross_entropy", target_key=3), tw.ConfigError,
              "target_key must be the key")  # fmt: skip
    untouched(model, lambda: tw.fit(model, heads, loss={"label": "cross_entropy"}, loss_weights={"boxes": 2.0}),
              tw.ConfigError, "loss_weights must give a number for heads that have a loss")  # fmt: skip

    def broken(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(2).float().mean()  # no dimension 2

    untouched(model, lambda: tw.fit(model, heads, loss={"label": "cross_entropy"}, metrics={"label": [broken]},
                                    progress=False), tw.ConfigError, "Metric 'label_broken' raised IndexError")  # fmt: skip
    plain = nn.Linear(4, 3)
    untouched(plain, lambda: tw.fit(plain, (x, y), progress=False), tw.ConfigError,
              "A loss is needed: none was given, and the model's outputs carry none")  # fmt: skip

    keywords = Features()
    batch = {"features": x, "extra": x, "labels": y}
    untouched(keywords, lambda: tw.fit(keywords, batch, loss="cross_entropy", progress=False), tw.DataError,
              r"keys 'extra'; forward takes features")  # fmt: skip
    # the targets' key is not the model's to take: it is left out of the call
    history = tw.fit(Features(), {"features": x, "labels": y}, loss="cross_entropy", progress=False)
    assert history.epochs == 1


def test_targets_for_several_heads_as_a_tuple_are_not_read_as_batches() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    x, y = blobs(samples=32)
    history = tw.fit(Pair(), (x, (y, x[:, :1])), loss=["cross_entropy", "mse"], metrics={0: "accuracy"}, progress=False)
    assert set(without_time(history)) == {"loss", "loss_output_0", "loss_output_1", "output_0_accuracy"}


# --- iterable datasets ------------------------------------------------------------------------


class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Any:
        return zip(self.x, self.y, strict=True)


def test_an_iterable_dataset_is_batched_with_batch_size() -> None:
    x, y = blobs(samples=40)
    sizes: list[int] = []
    seen = tw.LambdaCallback(on_train_batch_start=lambda run: sizes.append(run.batch.size))
    tw.fit(nn.Linear(4, 3), Stream(x, y), loss="cross_entropy", batch_size=16, callbacks=[seen], progress=False)
    assert sizes == [16, 16, 8]
    with pytest.raises(tw.ConfigError, match="val_split needs in-memory data or a Dataset") as error:
        tw.fit(nn.Linear(4, 3), Stream(x, y), loss="cross_entropy", val_split=0.2, progress=False)
    assert "IterableDataset" in str(error.value)


def test_a_run_stopped_mid_epoch_on_padded_tokens_resumes_to_the_same_token_means(tmp_path: Any) -> None:
    ids, tags = tagged()

    def run(directory: Any, **options: Any) -> tuple[tw.History, nn.Module]:
        torch.manual_seed(0)
        model = Tagger()
        history = tw.fit(model, (ids, tags), loss="cross_entropy", metrics=["accuracy"], batch_size=8, epochs=2,
                         lr=0.5, seed=0, checkpoint_dir=directory, checkpoint_every=1, progress=False, **options)  # fmt: skip
        return history, model

    golden, expected = run(tmp_path / "golden")

    def crash_at_batch_3(state: tw.Run) -> None:
        if state.epoch == 0 and state.batches_done == 3:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        run(tmp_path / "run", callbacks=[tw.LambdaCallback(on_train_batch_end=crash_at_batch_3)])
    history, model = run(tmp_path / "run", resume=True)
    assert history["loss"] == golden["loss"] and history["accuracy"] == golden["accuracy"]  # the sums were saved
    assert same_weights(model, expected, atol=0)


def test_a_causal_lm_s_own_loss_counts_the_labels_it_scores() -> None:
    """GPT-2 shifts its labels itself: the probe tells, and the epoch mean counts labels[:, 1:]."""
    ids, mask = padded(samples=12, vocabulary=30)
    labels = torch.where(mask.bool(), ids, -100)
    model = gpt2()
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with pytest.warns(tw.TrainwellWarning):
        result = tw.evaluate(model, data, metrics=["accuracy"], batch_size=5)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    following = labels[:, 1:]
    counted = following != -100
    expected = functional.cross_entropy(logits.reshape(-1, 30), following.reshape(-1))
    assert result["loss"] == pytest.approx(float(expected), abs=1e-5)  # the model upcasts to float itself
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1)[counted] == following[counted]).float().mean()))


def test_metrics_alone_skip_torch_s_ignored_label() -> None:
    ids, tags = tagged(samples=16)
    model = Tagger()
    result = tw.evaluate(model, (ids, tags), metrics=["accuracy"])
    with torch.no_grad():
        predicted = model(ids).argmax(-1)
    counted = tags != -100
    assert result["accuracy"] == pytest.approx(float((predicted[counted] == tags[counted]).float().mean()))


def test_a_batch_with_every_position_ignored_counts_for_nothing_and_stops_nothing() -> None:
    ids, tags = tagged(samples=16)
    tags[:8] = -100  # the whole first batch is padding
    torch.manual_seed(0)
    model = Tagger()
    history = tw.fit(model, (ids, tags), loss="cross_entropy", batch_size=8, shuffle=False, epochs=2, progress=False)
    assert history.epochs == 2 and all(value == value for value in history["loss"])  # no NaN, not stopped


def test_validation_data_with_sample_weights_and_a_validation_split_by_a_named_key() -> None:
    x, y = blobs(samples=40)
    weights = torch.rand(40)
    history = tw.fit(nn.Linear(4, 3), (x, y), loss="cross_entropy", val=(x, y, weights), progress=False)
    assert "val_loss" in history
    history = tw.fit(Features(), {"features": x, "label": y}, loss="cross_entropy", target_key="label", val_split=0.25,
                     metrics=["accuracy"], progress=False)  # fmt: skip
    assert "val_accuracy" in history


def test_the_labels_of_a_dict_are_moved_to_the_device_once() -> None:
    from trainwell.data import as_in_memory

    memory = as_in_memory({"ids": torch.ones(4, 3), "labels": torch.zeros(4, dtype=torch.long)}, torch.float32)
    assert memory is not None and memory.targets is memory.inputs["labels"]
    moved = memory.to(torch.device("meta"))  # a real move (meta tensors are new objects), with no GPU needed
    assert moved.targets is moved.inputs["labels"] and moved.targets.device.type == "meta"
