"""A notebook kernel's display, in this process: what the notebook contender trains under.

IPython's shell with ipykernel's own display publisher, which signs and serialises every
display message with a jupyter_client ``Session`` and sends it on a ZMQ socket, as a kernel
sends it to the browser (here a PUB socket with no subscriber, so each message is dropped
once sent). Inside ``kernel_display`` the shell has a kernel attribute, so trainwell recognises
a notebook as it does in Jupyter, and ``fit`` draws its notebook display with the cost of a
real kernel's messages.

Run as a script, it measures the case a one-epoch workload cannot show: many short epochs
(each epoch's start and end change the display), with ``progress="auto"`` and ``"plot"``
against ``progress=False``, in rounds of rotated order.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


def available() -> bool:
    """Whether the kernel's packages are installed (the dev extra installs them)."""
    try:
        import ipykernel  # noqa: F401
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Shown:
    """The seconds the display spent in its hooks (its messages included) in one block."""

    seconds: float = 0.0


@functools.cache
def _shell() -> Any:
    """One shell for the process (no history: nothing written to ~/.ipython, no history thread)."""
    import zmq
    from ipykernel.zmqshell import ZMQDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from jupyter_client.session import Session
    from traitlets.config import Config

    shell = InteractiveShell.instance(config=Config({"HistoryManager": {"enabled": False}}))
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.bind("inproc://display")
    shell.display_pub = ZMQDisplayPublisher(shell=shell, session=Session(key=b"bench"), pub_socket=socket)
    return shell


@contextlib.contextmanager
def kernel_display() -> Iterator[Shown]:
    """Run the body as in a notebook cell, with the display's hooks timed."""
    from trainwell.progress import ProgressDisplay

    shown = Shown()

    def timed(hook: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(hook)
        def run(*args: Any) -> None:
            started = time.perf_counter()
            hook(*args)
            shown.seconds += time.perf_counter() - started

        return run

    shell = _shell()
    shell.kernel = object()  # what marks a notebook kernel's shell
    hooks = {name: hook for name, hook in vars(ProgressDisplay).items() if name.startswith("on_")}
    for name, hook in hooks.items():
        setattr(ProgressDisplay, name, timed(hook))
    try:
        yield shown
    finally:
        for name, hook in hooks.items():
            setattr(ProgressDisplay, name, hook)
        del shell.kernel


def _many_epochs(progress: bool | str, epochs: int) -> tuple[float, float]:
    """Seconds of a small fit of many short epochs, and the display hooks' share of them."""
    import trainwell

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1500, 20, generator=generator)
    targets = (inputs[:, :2].sum(1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    with kernel_display() if progress is not False else contextlib.nullcontext(Shown()) as shown:
        started = time.perf_counter()
        trainwell.fit(model, (inputs, targets), loss="cross_entropy", metrics=["accuracy"], epochs=epochs,
                      batch_size=256, val_split=0.1, seed=0, progress=progress)  # fmt: skip
        seconds = time.perf_counter() - started
    return seconds, shown.seconds / seconds


def main(rounds: int = 7, epochs: int = 200) -> None:
    """Print the many-short-epochs measurement (median of ``rounds``, after one to warm up)."""
    settings: list[bool | str] = [False, "auto", "plot"]
    seconds: dict[str, list[float]] = {str(setting): [] for setting in settings}
    shares: dict[str, list[float]] = {str(setting): [] for setting in settings}
    for round_index in range(rounds + 1):
        for setting in settings[round_index % 3 :] + settings[: round_index % 3]:
            took, share = _many_epochs(setting, epochs)
            if round_index:
                seconds[str(setting)].append(took)
                shares[str(setting)].append(share)
    quiet = seconds["False"]
    print(f"{epochs} epochs of 6 batches (1350 samples, batch 256) and validation; median of {rounds} rounds")
    print(f"progress=False: {statistics.median(quiet):.3f}s")
    for setting in ("auto", "plot"):
        ratios = sorted(q / s for q, s in zip(quiet, seconds[setting], strict=True))
        share = statistics.median(shares[setting])
        print(f'progress="{setting}" in a notebook: {statistics.median(ratios):.3f}x progress=False '
              f"({ratios[0]:.3f}-{ratios[-1]:.3f}); its hooks {share:.2%} of the time")  # fmt: skip


if __name__ == "__main__":
    main(*(int(argument) for argument in sys.argv[1:]))
