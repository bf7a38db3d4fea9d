"""The data dispatcher: every input kind to Batches, orders that depend on (seed, epoch) only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainwell as tw
from trainwell import batches as batches_module
from trainwell.batches import DatasetBatches, Layout, LoaderBatches, TensorBatches, fits_on_device, to_batches
from trainwell.data import InMemory, epoch_order, split_validation

CPU = torch.device("cpu")


def batches_of(data: object, **options: object) -> object:
    settings = {"batch_size": 4, "shuffle": True, "seed": 1, "device": CPU, "dtype": torch.float32} | options
    return to_batches(data, **settings)  # type: ignore[arg-type]


def test_kinds_are_dispatched() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)
    assert isinstance(batches_of((x, y)), TensorBatches)
    assert isinstance(batches_of(TensorDataset(x, y)), TensorBatches)  # the fast path
    assert isinstance(batches_of(DataLoader(TensorDataset(x, y))), TensorBatches)  # same fast path
    subset = torch.utils.data.Subset(TensorDataset(x, y), [0, 1, 2])
    assert isinstance(batches_of(DataLoader(subset, batch_size=2, shuffle=True)), DatasetBatches)  # rebuilt
    custom = DataLoader(subset, sampler=torch.utils.data.WeightedRandomSampler([1.0, 1.0, 1.0], 3))
    assert isinstance(batches_of(custom), LoaderBatches)  # used as given
    assert isinstance(batches_of([(x, y)] * 3), LoaderBatches)
    assert isinstance(batches_of(torch.utils.data.Subset(TensorDataset(x, y), [0, 1])), DatasetBatches)


def test_in_memory_batches_cover_every_sample_once_per_epoch_in_a_seeded_order() -> None:
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    batches = batches_of((x, y))
    epoch = list(batches.for_epoch(0))  # type: ignore[attr-defined]
    assert [batch.size for batch in epoch] == [4, 4, 2]
    seen = torch.cat([batch.targets for batch in epoch])
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))
    assert torch.equal(torch.cat([batch.inputs[:, 0] for batch in epoch]).long(), seen)  # rows stay paired
    again = torch.cat([batch.targets for batch in batches.for_epoch(0)])  # type: ignore[attr-defined]
    assert torch.equal(seen, again)
    other = torch.cat([batch.targets for batch in batches.for_epoch(1)])  # type: ignore[attr-defined]
    assert not torch.equal(seen, other)
    skipped = torch.cat([batch.targets for batch in batches.for_epoch(0, skip=1)])  # type: ignore[attr-defined]
    assert torch.equal(skipped, seen[4:])


def test_dataset_order_matches_the_epoch_order_and_skips() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)
    batches = batches_of(torch.utils.data.Subset(TensorDataset(x, y), list(range(10))))
    seen = torch.cat([batch.targets for batch in batches.for_epoch(2, skip=1)])  # type: ignore[attr-defined]
    assert torch.equal(seen, epoch_order(10, seed=1, epoch=2)[4:])


def test_unshuffled_in_memory_batches_are_views_in_order() -> None:
    x = torch.randn(10, 3)
    first = next(iter(batches_of((x, torch.arange(10)), shuffle=False).for_epoch(0)))  # type: ignore[attr-defined]
    assert first.inputs.data_ptr() == x.data_ptr()


def test_arrays_are_converted_to_the_models_float_dtype_and_labels_kept() -> None:
    batches = batches_of((np.ones((5, 2)), np.arange(5)), dtype=torch.float32)
    batch = next(iter(batches.for_epoch(0)))  # type: ignore[attr-defined]
    assert batch.inputs.dtype == torch.float32 and batch.targets.dtype == torch.int64
    with pytest.raises(tw.DataError, match="must be numeric"):
        batches_of((np.array(["a", "b"]), np.arange(2)))


def test_split_validation_is_disjoint_complete_and_seeded() -> None:
    x, y = torch.arange(20.0).unsqueeze(1), torch.arange(20)
    (_, train_y), (_, val_y) = split_validation((x, y), 0.25, seed=5, dtype=torch.float32)
    assert len(val_y) == 5 and len(train_y) == 15
    assert sorted(torch.cat([train_y, val_y]).tolist()) == list(range(20))
    (_, again_y) = split_validation((x, y), 0.25, seed=5, dtype=torch.float32)[1]
    assert torch.equal(val_y, again_y)
    with pytest.raises(tw.ConfigError, match="val_split needs in-memory data or a Dataset"):
        split_validation(DataLoader(TensorDataset(x, y)), 0.25, seed=5, dtype=torch.float32)
    with pytest.raises(tw.DataError, match="leaves no samples"):
        split_validation((x[:2], y[:2]), 0.1, seed=5, dtype=torch.float32)


def test_batches_of_unexpected_shape_are_explained() -> None:
    x = torch.randn(4, 2)
    with pytest.raises(tw.DataError, match=r"Each batch must be \(inputs, targets\)"):
        tw.fit(torch.nn.Linear(2, 1), [(x, x, x, x)], loss="mse", progress=False)


def test_a_rebuilt_dataloader_with_workers_pins_their_batches_in_its_own_thread_for_a_gpu() -> None:
    # Only built, never iterated (this machine has no GPU): the options the rebuilt loader gets.
    # Without workers nothing changes: the batches may be CUDA tensors (a Dataset on the GPU), which
    # cannot be pinned, and to_device pins the CPU ones in the same thread the loader would.
    subset = torch.utils.data.Subset(TensorDataset(torch.randn(10, 3), torch.arange(10)), list(range(8)))
    with_workers = DataLoader(subset, batch_size=2, shuffle=True, num_workers=2)  # pin_memory=False: the default
    pinned = {
        (workers, device): batches_of(loader, device=torch.device(device)).loader_options["pin_memory"]
        for workers, loader in ((2, with_workers), (0, DataLoader(subset, batch_size=2, shuffle=True)))
        for device in ("cuda", "cpu")
    }
    assert pinned == {(2, "cuda"): True, (2, "cpu"): False, (0, "cuda"): False, (0, "cpu"): False}


# No GPU exists here. The "meta" device (tensors with shapes but no storage) stands in for it to
# check the plumbing of data kept on the device, and torch.cuda.mem_get_info is replaced to
# check the decision; neither says anything about speed.
@pytest.mark.parametrize("sharded", [False, True])
def test_in_memory_data_that_fits_moves_to_the_device_once(monkeypatch: pytest.MonkeyPatch, sharded: bool) -> None:
    monkeypatch.setattr(batches_module, "fits_on_device", lambda nbytes, device: True)
    x, y = torch.randn(50, 3), torch.randint(0, 2, (50,))
    batches, on_cpu = (
        TensorBatches(InMemory(x, y), batch_size=16, shuffle=True, seed=0, device=torch.device(device))
        for device in ("meta", "cpu")
    )
    if sharded:
        for each in (batches, on_cpu):
            each.lay_out(Layout(rank=1, world_size=2))
    moved = []
    for epoch in range(2):
        delivered, expected = list(batches.for_epoch(epoch)), list(on_cpu.for_epoch(epoch))
        moved.append(batches.data)
        assert batches.data.inputs.device.type == "meta" and batches.data.targets.device.type == "meta"
        assert all(batch.inputs.device.type == "meta" and batch.targets.device.type == "meta" for batch in delivered)
        assert [batch.size for batch in delivered] == [batch.size for batch in expected]
        assert [batch.inputs.shape for batch in delivered] == [batch.inputs.shape for batch in expected]
        assert [batch.global_size for batch in delivered] == [batch.global_size for batch in expected]
    assert moved[0] is moved[1]  # moved at the first epoch only


def test_data_is_kept_on_a_gpu_only_when_it_takes_at_most_a_quarter_of_the_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))  # a GPU, 8 GiB free
    cuda = torch.device("cuda")
    assert fits_on_device(2 * 2**30, cuda) and not fits_on_device(2 * 2**30 + 1, cuda)
    assert not fits_on_device(10, torch.device("cpu"))  # the CPU: the data already is where the model is
