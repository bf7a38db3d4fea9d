"""The same fit under real torchrun (2 processes, gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import without_time

pytestmark = pytest.mark.slow  # real subprocesses: `pytest -m "not slow"` leaves them out

TORCHRUN = str(Path(sys.executable).parent / "torchrun")

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from torch import nn
    from sklearn.datasets import load_digits
    import trainwell as tw

    mode, out, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank = int(os.environ.get("RANK", "0"))

    def model_for(inputs, outputs):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, outputs))

    if mode in ("train", "restart", "fail"):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(253, 6, generator=generator)
        y = (x[:, :2].sum(1) > 0).long() + (x[:, 2] > 0.5).long()
        model = model_for(6, 3)

        class Chaos(tw.Callback):
            def on_train_batch_end(self, run):
                if mode == "fail" and run.rank == 1 and run.global_step == 2:
                    raise RuntimeError("rank one failed on purpose")
                if mode == "restart" and run.rank == 1 and run.global_step == 7:
                    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                        os.kill(os.getpid(), signal.SIGKILL)

        history = tw.fit(model, (x, y), loss="cross_entropy", optimizer="adam", lr=0.01, epochs=3,
                         batch_size=batch_size, metrics=["accuracy", "f1_macro", "iou"], val_split=0.2, seed=0,
                         callbacks=[tw.CSVLogger(os.path.join(out, "log.csv")), Chaos()],
                         checkpoint_dir=os.path.join(out, "checkpoints") if mode == "restart" else None,
                         checkpoint_every=3 if mode == "restart" else None, resume="auto" if mode == "restart" else False)
        torch.save({key: value for key, value in model.state_dict().items()}, os.path.join(out, f"weights-{rank}.pt"))
        if rank == 0:
            with open(os.path.join(out, "history.json"), "w") as file:
                json.dump(history.to_dict(), file)
    else:
        features, labels = load_digits(return_X_y=True)
        x, y = torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)
        model = model_for(64, 10)
        results = tw.evaluate(model, (x, y), loss="cross_entropy", batch_size=100, progress=True,
                              metrics=["accuracy", "f1_macro", "iou", "precision_per_class", "balanced_accuracy"])
        outputs = tw.predict(model, x, batch_size=100, all_ranks=True, progress=True)

        class Stop(tw.Callback):  # each process stops on its own: rank 0 after 3 batches, rank 1 after 2
            def on_eval_batch_end(self, run):
                run.stop_training = run.eval_batches_done == 3 - run.rank

        stopped = tw.predict(model, x, batch_size=100, callbacks=Stop(), progress=False)
        _, scored, targets = tw.evaluate(model, (x, y), loss="cross_entropy", batch_size=64, progress=False,
                                         return_outputs=True)
        torch.save({"results": results, "outputs": outputs, "stopped": stopped, "scored": scored, "targets": targets},
                   os.path.join(out, f"evaluate-{rank}.pt"))
    print(f"rank {rank} done", flush=True)
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "job.py"
    path.write_text(SCRIPT)
    return path


def launch(
    script: Path, mode: str, out: Path, batch_size: int, processes: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        command = [sys.executable, str(script)]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", *extra, str(script)]
    return subprocess.run([*command, mode, str(out), str(batch_size)], capture_output=True, text=True, timeout=180,
                          env=environment, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def single(script: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = launch(script, "train", out, 32, 1)
    assert result.returncode == 0, result.stderr
    return out


def load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def test_two_processes_train_the_same_model_as_one_with_the_global_batch(
    script: Path, single: Path, tmp_path: Path
) -> None:
    result = launch(script, "train", tmp_path, 16, 2)
    assert result.returncode == 0, result.stderr
    reference, first, second = (
        load(single / "weights-0.pt"),
        load(tmp_path / "weights-0.pt"),
        load(tmp_path / "weights-1.pt"),
    )
    for key, value in reference.items():
        assert torch.equal(first[key], second[key]), key  # identical on every rank
        assert torch.allclose(first[key], value, atol=2e-5), key  # and the single-process model, up to rounding
    expected, history = (
        json.loads((single / "history.json").read_text()),
        json.loads((tmp_path / "history.json").read_text()),
    )
    assert history.keys() == expected.keys()
    for key in without_time(expected):  # the timing columns differ from run to run
        assert history[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    # 202 training samples, 32 per step: the ragged last step (10 samples) is split 5 + 5.
    # Only rank 0 printed and wrote: one summary line per epoch, one CSV row per epoch.
    assert result.stdout.count("samples/s") == 3
    assert "Training on 2 processes: batch_size=16 per process, 32 per optimizer step." in result.stderr
    assert result.stderr.count("Training on 2 processes") == 1
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 4


def test_evaluation_counts_every_sample_exactly_once(script: Path, tmp_path: Path) -> None:
    alone = launch(script, "evaluate", tmp_path / "one", 0, 1)
    assert alone.returncode == 0, alone.stderr
    pair = launch(script, "evaluate", tmp_path / "two", 0, 2)
    assert pair.returncode == 0, pair.stderr
    expected = load(tmp_path / "one" / "evaluate-0.pt")
    for rank in (0, 1):  # 1,797 samples: 899 on rank 0, 898 on rank 1, no padding
        got = load(tmp_path / "two" / f"evaluate-{rank}.pt")
        # Counting metrics come from the same integer counts, summed across the ranks: exactly equal.
        counted = [key for key in expected["results"] if key != "loss"]
        assert len(counted) == 14 and all(got["results"][key] == expected["results"][key] for key in counted)
        assert got["results"]["loss"] == pytest.approx(expected["results"]["loss"], rel=1e-6)
        assert torch.allclose(got["outputs"], expected["outputs"], atol=1e-6)  # in input order
    # Only rank 0 shows the passes (progress=True): 9 batches of its 899 samples.
    assert pair.stdout.count("Evaluate  9/9 batches") == 1 and pair.stdout.count("Predict  9/9 batches") == 1
    # Stopped passes: the first samples in input order, up to the first one a process did not reach
    # (rank 1 stopped after 200 of its samples, positions 1, 3, ..., 399: the first 401 samples).
    assert torch.equal(expected["stopped"], expected["outputs"][:300])
    stopped = load(tmp_path / "two" / "evaluate-0.pt")["stopped"]
    assert torch.allclose(stopped, expected["outputs"][:401], atol=1e-6)
    assert load(tmp_path / "two" / "evaluate-1.pt")["stopped"] is None
    # evaluate(return_outputs=True) gathers what it scored on rank 0, in input order (batches of 64
    # per process: a ragged last batch on each).
    first, second = (load(tmp_path / "two" / f"evaluate-{rank}.pt") for rank in (0, 1))
    assert torch.equal(first["targets"], expected["targets"]) and len(expected["targets"]) == 1797
    assert torch.allclose(first["scored"], expected["scored"], atol=1e-6)
    assert second["scored"] is None and second["targets"] is None


def test_a_failure_on_one_rank_ends_the_job_promptly_with_its_error(script: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = launch(script, "fail", tmp_path, 16, 2)
    assert result.returncode != 0
    assert time.monotonic() - started < 90
    assert "rank one failed on purpose" in result.stdout + result.stderr


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(script: Path, tmp_path: Path) -> None:
    golden = launch(script, "train", tmp_path / "golden", 16, 2)
    assert golden.returncode == 0, golden.stderr
    result = launch(script, "restart", tmp_path / "restart", 16, 2, "--max-restarts=1")
    assert result.returncode == 0, result.stderr
    assert "restart" in (result.stdout + result.stderr).lower()
    expected, got = load(tmp_path / "golden" / "weights-0.pt"), load(tmp_path / "restart" / "weights-0.pt")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    history = json.loads((tmp_path / "restart" / "history.json").read_text())
    assert without_time(history) == without_time(json.loads((tmp_path / "golden" / "history.json").read_text()))


def test_the_command_line_tool_under_torchrun(tmp_path: Path) -> None:
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainwell", "train", "--data", "iris",
               "--epochs", "3", "--seed", "1"]  # fmt: skip
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=environment,
                            check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("samples/s") == 3 and result.stdout.count("Run folder:") == 1
    (run,) = (tmp_path / "runs").iterdir()  # one folder, named alike by both ranks, no leftovers
    assert {path.name for path in run.iterdir()} >= {"history.csv", "metrics.json", "curves.png", "model.pt"}
    assert len((run / "history.csv").read_text().splitlines()) == 4


SEAMS = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    import trainwell as tw

    out = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}

    class Pairs(Dataset):
        def __init__(self, inputs, targets):
            self.inputs, self.targets = inputs, targets
        def __len__(self):
            return len(self.inputs)
        def __getitem__(self, index):
            return self.inputs[index], self.targets[index]

    class Count(tw.Callback):
        def on_fit_start(self, run):
            self.planned, self.seen = run.train_batches.num_batches, 0
        def on_train_batch_start(self, run):
            self.seen += 1

    def data(samples):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(samples, 6, generator=generator)
        return x, (x[:, :2].sum(1) > 0).long()

    # 1. accumulation with a ragged last window: 99 samples, 8 per process and step, 2 steps a window
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    tw.fit(model, data(99), loss="cross_entropy", optimizer="sgd", lr=0.1, epochs=2, batch_size=16 // processes,
           grad_accum_steps=2, seed=0, progress=False)
    results["accumulated"] = {key: value.tolist() for key, value in model.state_dict().items()}

    # 2. step counts and BatchNorm with ragged tails, from tensors and from a Dataset
    for samples in (65, 67):
        for norm in (False, True):
            for kind in ("tensors", "dataset"):
                torch.manual_seed(0)
                layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if norm else []) + [nn.ReLU(), nn.Linear(8, 2)]
                x, y = data(samples)
                count = Count()
                train = (x, y) if kind == "tensors" else Pairs(x, y)
                tw.fit(nn.Sequential(*layers), train, loss="cross_entropy", batch_size=64 // processes, epochs=1,
                       scheduler="onecycle", seed=0, callbacks=[count], progress=False)
                results[f"{samples}-{norm}-{kind}"] = [count.planned, count.seen]
    # 3. a NaN loss on one rank only: every rank stops before that step, with the same weights
    class LogInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 2)
        def forward(self, inputs):
            return self.linear(torch.log(inputs))  # NaN for the one negative feature

    x, y = data(64)
    x = x.abs() + 0.1
    x[37, 0] = -1.0
    torch.manual_seed(0)
    model, stopper = LogInputs(), tw.TerminateOnNaN()
    with open(os.devnull, "w"):
        history = tw.fit(model, (x, y), loss="cross_entropy", batch_size=16 // processes, epochs=2,
                         shuffle=False, callbacks=[stopper], progress=False)
    results["nan"] = [list(stopper.stopped_at or ()), history.epochs, model.linear.weight.tolist()]

    # 4. predict where a rank has no sample
    results["predict"] = tw.predict(nn.Linear(6, 2), x[:1], all_ranks=True).shape[0]

    # 5. a tagger over padded sequences (-100): each update averages the window's tokens over
    # both ranks, with and without accumulation
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.out = nn.Embedding(12, 8), nn.Linear(8, 4)
        def forward(self, ids):
            return self.out(torch.tanh(self.embedding(ids)))

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 12, (49, 7), generator=generator)  # the last step: one sample, a placeholder on rank 1
    tags = torch.randint(0, 4, (49, 7), generator=generator)
    padding = torch.arange(7)[None, :] >= torch.randint(1, 8, (49, 1), generator=generator)
    ids[padding], tags[padding] = 0, -100
    for accumulation in (1, 2):
        torch.manual_seed(0)
        tagger = Tagger()
        history = tw.fit(tagger, (ids, tags), loss="cross_entropy", lr=0.5, batch_size=16 // processes // accumulation,
                         grad_accum_steps=accumulation, epochs=2, seed=0, progress=False)
        results[f"tokens-{accumulation}"] = [history["loss"], [p.tolist() for p in tagger.parameters()]]
    with open(os.path.join(out, f"seams-{rank}.json"), "w") as file:
        json.dump(results, file)
    """
)


def test_accumulation_tails_and_batch_norm_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "seams.py"
    script.write_text(SEAMS)
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    for processes, folder in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        folder.mkdir()
        command = [sys.executable] if processes == 1 else [TORCHRUN, "--standalone", "--nproc_per_node=2"]
        result = subprocess.run([*command, str(script), str(folder)], capture_output=True, text=True, timeout=300,
                                env=environment, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
    alone = json.loads((tmp_path / "one" / "seams-0.json").read_text())
    first, second = (json.loads((tmp_path / "two" / f"seams-{rank}.json").read_text()) for rank in (0, 1))
    # Every rank ends with bitwise the same weights, and (float rounding only: 1e-5) those of one
    # process taking the global batch of 16 with the same accumulation.
    for key, value in alone["accumulated"].items():
        assert first["accumulated"][key] == second["accumulated"][key], key
        assert torch.allclose(torch.tensor(first["accumulated"][key]), torch.tensor(value), atol=1e-5), key
    # The plan's count is the steps each rank runs (schedules and the bar use it). 2 ranks x 32:
    # 65 samples = 2 steps (the second: one sample on rank 0, a placeholder on rank 1); with
    # BatchNorm a tail that would leave a rank one sample is left out: 1 step for 65 and 67.
    expected = {(65, False): 2, (67, False): 2, (65, True): 1, (67, True): 1}
    for (samples, norm), steps in expected.items():
        for kind in ("tensors", "dataset"):
            key = f"{samples}-{norm}-{kind}"
            assert first[key] == second[key] == [steps, steps], key
            assert alone[key][0] == alone[key][1], key  # one process: planned == run, too
    assert first["predict"] == second["predict"] == alone["predict"] == 1
    # Padded tokens: 2 ranks x 8 (or x 4 with 2-batch windows) update exactly as one process with
    # 16 per step, where the loss is the mean over the step's counted tokens (float rounding: 1e-6).
    for accumulation in (1, 2):
        key = f"tokens-{accumulation}"
        assert first[key] == second[key], key
        assert torch.allclose(torch.tensor(first[key][0]), torch.tensor(alone[key][0]), atol=1e-6), key
        for ours, reference in zip(first[key][1], alone[key][1], strict=True):
            assert torch.allclose(torch.tensor(ours), torch.tensor(reference), atol=1e-6), key
    # Sample 37 is in the third global batch (16 per step), on rank 1 only: both ranks stop there.
    assert first["nan"] == second["nan"] and first["nan"][0] == [0, 2]
    assert first["nan"][2] == alone["nan"][2] or torch.allclose(
        torch.tensor(first["nan"][2]), torch.tensor(alone["nan"][2]), atol=1e-6
    )


FOLDERS = textwrap.dedent(
    """
    import os, sys
    import trainwell as tw
    sys.path.insert(0, sys.argv[4])
    from conftest import blobs, make_mlp

    layout, base, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rank, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # "local": each process names its own folder, as one path on machines without shared storage would be
    directory = os.path.join(base, f"node{rank}" if layout == "local" else "ck")
    try:
        tw.fit(make_mlp(), blobs(), loss="cross_entropy", epochs=epochs, batch_size=32 // processes, seed=0,
               progress=False, checkpoint_dir=directory, resume="auto")
    except tw.ConfigError as error:
        print(f"rank {rank} refused: {error}", flush=True)
        sys.exit(3)
    print(f"rank {rank} trained", flush=True)
    """
)


def run_folders(tmp_path: Path, layout: str, processes: int, epochs: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "folders.py"
    script.write_text(FOLDERS)
    command = [sys.executable] if processes == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={processes}"]
    arguments = [layout, str(tmp_path / "out"), str(epochs), str(Path(__file__).parent)]
    return subprocess.run([*command, str(script), *arguments], capture_output=True, text=True, timeout=180,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, check=False)  # fmt: skip


def test_a_checkpoint_folder_the_processes_do_not_share_is_refused_on_every_rank(tmp_path: Path) -> None:
    result = run_folders(tmp_path, "local", 2, 2)
    assert result.returncode != 0
    for rank in (0, 1):  # every rank says so and exits: none waits in a collective the others left
        assert f"rank {rank} refused: The checkpoint folder is not shared by the processes" in result.stdout
    assert "rank 1 does not see rank 0's lock file" in result.stdout
    assert not list((tmp_path / "out").glob("node*/checkpoint-*.pt"))  # refused before any training


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resuming_on_another_number_of_processes_is_refused_with_the_fix(
    tmp_path: Path, before: int, after: int
) -> None:
    first = run_folders(tmp_path, "shared", before, 1)
    assert first.returncode == 0, first.stderr
    saved = {path.name: path.read_bytes() for path in (tmp_path / "out" / "ck").iterdir()}
    resumed = run_folders(tmp_path, "shared", after, 2)
    assert resumed.returncode != 0
    for rank in range(after):
        assert f"rank {rank} refused: The checkpoint was written by a different training setup" in resumed.stdout
    assert f"processes: {before} in the checkpoint, {after} now" in resumed.stdout
    assert (f"torchrun --nproc_per_node={before}" if before > 1 else "python script.py: 1 process") in resumed.stdout
    assert {path.name: path.read_bytes() for path in (tmp_path / "out" / "ck").iterdir()} == saved


RANKING = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import trainwell as tw
    sys.path.insert(0, sys.argv[2])
    from conftest import blobs, make_mlp

    rank = int(os.environ.get("RANK", "0"))
    history = tw.fit(make_mlp(), blobs(), loss="cross_entropy", metrics=["auroc", "f1_macro"], val_split=0.2,
                     epochs=2, batch_size=8, seed=0, progress=True)
    with open(os.path.join(sys.argv[1], f"ranking-{rank}.json"), "w") as file:
        json.dump({key: history[key] for key in ("auroc", "val_auroc", "f1_macro")}, file)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.label, self.box = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
        def forward(self, inputs):
            return {"label": self.label(inputs), "box": self.box(inputs)}

    x, y = blobs(samples=101)
    boxes = torch.arange(202, dtype=torch.float32).reshape(101, 2)
    _, outputs, targets = tw.evaluate(TwoHeads(), (x, {"label": y, "box": boxes}), batch_size=8, progress=False,
                                      loss={"label": "cross_entropy", "box": "mse"}, return_outputs=True)
    torch.save({"outputs": outputs, "targets": targets}, os.path.join(sys.argv[1], f"heads-{rank}.pt"))
    """
)


def test_auroc_with_the_display_on_and_two_heads_outputs_under_torchrun(tmp_path: Path) -> None:
    # The display reads running values on rank 0 only; a torchmetrics value gathers from every
    # rank, so it is computed at the epoch's end only (it hung before).
    pytest.importorskip("torchmetrics", reason="auroc needs the metrics extra")
    script = tmp_path / "ranking.py"
    script.write_text(RANKING)
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path), str(Path(__file__).parent)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = (json.loads((tmp_path / f"ranking-{rank}.json").read_text()) for rank in (0, 1))
    assert first == second and all(0.5 < value <= 1 for value in first["val_auroc"])
    # evaluate(return_outputs=True) of a model with two heads: a dict by head, gathered on rank 0 in input order.
    heads = load(tmp_path / "heads-0.pt")
    assert torch.equal(heads["targets"]["box"], torch.arange(202, dtype=torch.float32).reshape(101, 2))
    assert heads["outputs"]["label"].shape == (101, 3) and load(tmp_path / "heads-1.pt")["outputs"] is None
