"""Workloads (g)-(i): sequences of different lengths through a user's collate function, as the
Hugging Face course and the PyTorch tutorials write them, and every contender that trains them.

(g) a tiny BERT classifier (``BertForSequenceClassification`` from a config, nothing downloaded)
on course-style dict batches ``{"input_ids", "attention_mask", "labels"}`` padded to the batch's
longest sequence, trained with the model's own loss; (h) an LSTM tagger over padded ``(tokens,
tags)`` batches whose padding tags are -100; (i) evaluate and predict with the (g) model.

Owns: the token data, the Datasets and collate functions, the two models, and the contenders of
these workloads (the hand-written loop, trainwell, Lightning, Hugging Face's ``Trainer``). Must
not time anything.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the name PyTorch's documentation uses
from torch import nn
from torch.utils.data import DataLoader, Dataset

import trainwell
from frameworks import lightning_module, lightning_trainer
from tasks import InferenceTask, Outcome, TrainTask

VOCAB = 1_000
PAD = 0
IGNORE = -100
TEXT_LR = 1e-3
TEXT_LENGTHS = (8, 64)  # (g): tokens per sequence, uniform
TAG_LENGTHS = (5, 50)  # (h)
TAGS = 12
TEXT_CLASSES = 2
MARKER = 7  # (g)'s label: whether this token occurs in the sequence
DATA_SEED = 3
MODEL_SEED = 4
INFERENCE_BATCH = 64

Batch = Any  # a dict of tensors for (g), a (tokens, tags) pair for (h)


def make_sequences(samples: int, tagger: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences padded with ``PAD`` to the longest, and their targets, as two tensors.

    (g): a label per sequence, 1 when ``MARKER`` occurs in it (half the sequences get one).
    (h): a tag per token, a fixed function of the token and its left neighbour (learnable by
    an LSTM), ``IGNORE`` at the padding.

    Returns:
        ``(tokens, targets)``: tokens (samples, longest) int64; targets (samples,) or (samples, longest).
    """
    generator = torch.Generator().manual_seed(DATA_SEED)
    low, high = TAG_LENGTHS if tagger else TEXT_LENGTHS
    lengths = torch.randint(low, high + 1, (samples,), generator=generator)
    tokens = torch.randint(MARKER + 1, VOCAB, (samples, high), generator=generator)
    padding = torch.arange(high) >= lengths[:, None]
    if tagger:
        previous = torch.cat([torch.zeros(samples, 1, dtype=torch.int64), tokens[:, :-1]], dim=1)
        tags = (tokens + previous) % TAGS
        return tokens.masked_fill(padding, PAD), tags.masked_fill(padding, IGNORE)
    labels = torch.randint(0, TEXT_CLASSES, (samples,), generator=generator)
    places = (torch.rand(samples, generator=generator) * lengths).long()
    marked = labels.bool()
    tokens[marked, places[marked]] = MARKER
    return tokens.masked_fill(padding, PAD), labels


class SentenceDataset(Dataset[dict[str, torch.Tensor]]):
    """(g)'s Dataset: one course-style dict per sentence, of its own length (not padded)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.tokens, self.labels = tokens, labels
        self.lengths = (tokens != PAD).sum(1).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index, : self.lengths[index]], "labels": self.labels[index]}


class TaggedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(h)'s Dataset: ``(tokens, tags)`` of one sentence, of its own length."""

    def __init__(self, tokens: torch.Tensor, tags: torch.Tensor) -> None:
        self.tokens, self.tags = tokens, tags
        self.lengths = (tokens != PAD).sum(1).tolist()

    def __len__(self) -> int:
        return len(self.tags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.lengths[index]
        return self.tokens[index, :length], self.tags[index, :length]


def pad_sentences(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(g)'s collate function: pad to the batch's longest sentence, with its attention mask."""
    ids = nn.utils.rnn.pad_sequence([sample["input_ids"] for sample in samples], batch_first=True, padding_value=PAD)
    return {
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "labels": torch.stack([s["labels"] for s in samples]),
    }


def pad_tagged(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h)'s collate function: tokens padded with ``PAD``, tags with ``IGNORE``."""
    tokens, tags = zip(*samples, strict=True)
    return (
        nn.utils.rnn.pad_sequence(list(tokens), batch_first=True, padding_value=PAD),
        nn.utils.rnn.pad_sequence(list(tags), batch_first=True, padding_value=IGNORE),
    )


def text_loader(
    tokens: torch.Tensor, targets: torch.Tensor, batch_size: int, tagger: bool, shuffle: bool = True
) -> DataLoader[Batch]:
    """The user's ``DataLoader(dataset, batch_size, shuffle=True, collate_fn=...)``."""
    if tagger:
        return DataLoader(TaggedDataset(tokens, targets), batch_size, shuffle=shuffle, collate_fn=pad_tagged)
    return DataLoader(SentenceDataset(tokens, targets), batch_size, shuffle=shuffle, collate_fn=pad_sentences)


class EncoderClassifier(nn.Module):
    """(g)'s model where transformers is not installed (the GPU kit's machine): torch's own
    transformer encoder with BERT's sizes, called as a Hugging Face classifier is
    (``model(input_ids=, attention_mask=, labels=)``) and returning ``{"loss", "logits"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64, padding_idx=PAD)
        self.position = nn.Embedding(TEXT_LENGTHS[1], 64)
        layer = nn.TransformerEncoderLayer(64, nhead=2, dim_feedforward=128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(64, TEXT_CLASSES)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.encoder(
            self.embed(input_ids) + self.position(positions), src_key_padding_mask=attention_mask == 0
        )
        logits = self.head(hidden[:, 0])
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def build_bert() -> nn.Module:
    """A 2-layer BERT with hidden size 64 and a 2-class head, from a config (nothing downloaded);
    ``EncoderClassifier`` of the same sizes where transformers is not installed."""
    torch.manual_seed(MODEL_SEED)
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        return EncoderClassifier()
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=TEXT_LENGTHS[1],
        num_labels=TEXT_CLASSES,
    )
    return BertForSequenceClassification(config)


class Tagger(nn.Module):
    """(h)'s model, as the PyTorch tutorial writes a tagger: embedding, LSTM, a linear layer per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64, padding_idx=PAD)
        self.lstm = nn.LSTM(64, 128, batch_first=True)
        self.out = nn.Linear(128, TAGS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.out(hidden)  # (N, T, TAGS)


def build_tagger() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return Tagger()


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=TEXT_LR)


def _tagger(task: TrainTask | InferenceTask) -> bool:
    return isinstance(task.model, Tagger)


def _loss_and_hits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hand-written step's loss, correct predictions and counted items (sentences or tokens),
    as tensors (nothing read back)."""
    if isinstance(batch, dict):
        out = model(**batch)
        labels = batch["labels"]
        hits = (out["logits"].detach().argmax(-1) == labels).sum()
        return out["loss"], hits, torch.tensor(float(len(labels)))
    tokens, tags = batch
    logits = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, TAGS), tags.reshape(-1), ignore_index=IGNORE)
    counted = tags != IGNORE
    hits = ((logits.detach().argmax(-1) == tags) & counted).sum()
    return loss, hits, counted.sum()


def tutorial_fit(task: TrainTask) -> Outcome:
    """The tutorial's loop over the user's DataLoader: ``.item()`` on the loss and counts every step."""
    assert task.loader is not None
    model, optimizer = task.model, _adamw(task.model)
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for batch in task.loader:
        loss, hits, items = _loss_and_hits(model, batch)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        counted = int(items.item())
        total_loss += loss.item() * counted
        correct += int(hits.item())
        seen += counted
    return Outcome(len(task.targets), total_loss / seen, correct / seen)


def hand_fit(task: TrainTask) -> Outcome:
    """The fastest hand-written loop over the user's DataLoader: sums kept as tensors, one read at
    the end, ``zero_grad(set_to_none=True)``; the epoch's loss averages over sentences (g) or
    counted tokens (h)."""
    assert task.loader is not None
    model, optimizer = task.model, _adamw(task.model)
    model.train()
    sums = torch.zeros(3)  # loss * items, correct, items
    for batch in task.loader:
        loss, hits, items = _loss_and_hits(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums.add_(torch.stack([loss.detach() * items, hits.to(sums.dtype), items.to(sums.dtype)]))
    return _outcome(len(task.targets), sums)


def _outcome(samples: int, sums: torch.Tensor) -> Outcome:
    total_loss, correct, items = sums.tolist()
    return Outcome(samples, total_loss / items, correct / items)


def trainwell_fit(task: TrainTask, progress: bool = True) -> Outcome:
    """``trainwell.fit(model, loader, optimizer="adamw", metrics=["accuracy"])``, display on or off."""
    loss = "cross_entropy" if _tagger(task) else None  # (g): the model's own loss
    history = trainwell.fit(
        task.model,
        task.loader,
        loss=loss,
        optimizer="adamw",
        lr=TEXT_LR,
        epochs=1,
        metrics=["accuracy"],
        progress=progress,
    )
    return Outcome(len(task.targets), history["loss"][0], history["accuracy"][0])


@functools.cache
def _lightning_class() -> Any:
    """A LightningModule around the model that logs the loss and accuracy to the progress bar, as
    its documentation shows (for (h) its epoch loss weights each batch by sentences, not tokens:
    ``self.log`` does not know the counted tokens unless told)."""
    from torchmetrics.classification import MulticlassAccuracy

    lightning = lightning_module()

    class Sequences(lightning.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self, model: nn.Module, classes: int) -> None:
            super().__init__()
            self.model = model
            self.train_accuracy = MulticlassAccuracy(num_classes=classes, average="micro", ignore_index=IGNORE)

        def training_step(self, batch: Batch, batch_index: int) -> torch.Tensor:
            if isinstance(batch, dict):
                out = self.model(**batch)
                loss, logits, targets = out["loss"], out["logits"], batch["labels"]
            else:
                tokens, targets = batch
                logits = self.model(tokens)
                loss = F.cross_entropy(logits.reshape(-1, TAGS), targets.reshape(-1), ignore_index=IGNORE)
            self.train_accuracy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("train_acc", self.train_accuracy, on_step=True, on_epoch=True, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _adamw(self.model)

    return Sequences


def lightning_fit(task: TrainTask) -> Outcome:
    """``Trainer(max_epochs=1).fit(LightningModule, the user's DataLoader)``, progress bar on."""
    module = _lightning_class()(task.model, TAGS if _tagger(task) else TEXT_CLASSES)
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning_trainer(root)
        trainer.fit(module, task.loader)
    metrics = trainer.callback_metrics
    return Outcome(len(task.targets), float(metrics["train_loss_epoch"]), float(metrics["train_acc_epoch"]))


def hf_trainer_fit(task: TrainTask) -> Outcome:
    """Hugging Face's ``Trainer`` as the course sets it up: the Dataset and the collate function,
    AdamW at the same lr and weight decay (its linear decay and its gradient clipping switched
    off, as the others have neither), its progress bar on, nothing saved or reported. It computes
    no training accuracy (NaN here)."""
    from transformers import Trainer, TrainingArguments

    assert task.loader is not None
    with tempfile.TemporaryDirectory() as root:
        arguments = TrainingArguments(
            output_dir=root,
            per_device_train_batch_size=task.batch_size,
            num_train_epochs=1,
            learning_rate=TEXT_LR,
            weight_decay=0.01,  # torch's AdamW default, which the other contenders use
            max_grad_norm=0,  # no clipping (its default clips at 1.0), as the others
            lr_scheduler_type="constant",
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=task.model,
            args=arguments,
            train_dataset=task.loader.dataset,
            data_collator=task.loader.collate_fn,
        )
        result = trainer.train()
    return Outcome(len(task.targets), float(result.training_loss))


def hand_evaluate(task: InferenceTask) -> Outcome:
    """``inference_mode`` over the user's DataLoader, sums on the device, one read."""
    assert task.loader is not None
    task.model.eval()
    with torch.inference_mode():
        sums = torch.zeros(3)
        for batch in task.loader:
            loss, hits, items = _loss_and_hits(task.model, batch)
            sums.add_(torch.stack([loss * items, hits.to(sums.dtype), items.to(sums.dtype)]))
    return _outcome(len(task.targets), sums)


def hand_predict(task: InferenceTask) -> Outcome:
    """``inference_mode``, the model called on the inputs alone (no labels, no loss), one ``cat``."""
    assert task.loader is not None
    task.model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [
                task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
                for batch in task.loader
            ]
        )
    return Outcome(len(logits))


def trainwell_evaluate(task: InferenceTask) -> Outcome:
    """``trainwell.evaluate(model, loader, metrics=["accuracy"])``: the model's own loss."""
    logs = trainwell.evaluate(task.model, task.loader, metrics=["accuracy"])
    return Outcome(len(task.targets), logs["loss"], logs["accuracy"])


def trainwell_predict(task: InferenceTask) -> Outcome:
    """``trainwell.predict(model, loader)``: the logits of every sentence."""
    return Outcome(len(trainwell.predict(task.model, task.loader)))


TEXT_TRAINERS: dict[str, Callable[[TrainTask], Outcome]] = {
    "tutorial": tutorial_fit,
    "best_hand": hand_fit,
    "trainwell": trainwell_fit,
    "trainwell_quiet": functools.partial(trainwell_fit, progress=False),
    "lightning": lightning_fit,
    "hf_trainer": hf_trainer_fit,
}
TEXT_SCORERS: dict[str, tuple[Callable[[InferenceTask], Outcome], Callable[[InferenceTask], Outcome]]] = {
    "best_hand": (hand_evaluate, hand_predict),
    "trainwell": (trainwell_evaluate, trainwell_predict),
}
