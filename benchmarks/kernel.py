"""A notebook kernel's display, in this process: what the notebook contender trains under.

IPython's shell with ipykernel's own display publisher, which signs and serialises every
display message with a jupyter_client ``Session`` and sends it on a ZMQ socket, as a kernel
sends it to the browser (here a PUB socket with no subscriber, so each message is dropped
once sent). The shell has a kernel attribute, so trainwell recognises a notebook as it does in
Jupyter, and ``fit`` draws its notebook display with the cost of a real kernel's messages.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


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
    """What the display did in one ``kernel_display`` block: the messages it sent (their content's
    size) and the seconds spent in its hooks, messages included."""

    sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def kernel_display() -> Iterator[Shown]:
    """Run the body as in a notebook cell, with the display's hooks timed."""
    import zmq
    from ipykernel.zmqshell import ZMQDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from jupyter_client.session import Session

    from trainwell.progress import ProgressDisplay

    shown = Shown()

    class CountingSession(Session):  # type: ignore[misc]
        def send(self, *args: Any, **kwargs: Any) -> Any:
            message = super().send(*args, **kwargs)
            shown.sizes.append(len(str(message["content"])))
            return message

    def timed(hook: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(hook)
        def run(*args: Any) -> None:
            started = time.perf_counter()
            hook(*args)
            shown.seconds += time.perf_counter() - started

        return run

    shell = InteractiveShell.instance()
    socket = zmq.Context.instance().socket(zmq.PUB)
    socket.bind("inproc://display")
    shell.display_pub = ZMQDisplayPublisher(shell=shell, session=CountingSession(key=b"bench"), pub_socket=socket)
    shell.kernel = object()  # what marks a notebook kernel's shell
    hooks = {name: hook for name, hook in vars(ProgressDisplay).items() if name.startswith("on_")}
    for name, hook in hooks.items():
        setattr(ProgressDisplay, name, timed(hook))
    try:
        yield shown
    finally:
        for name, hook in hooks.items():
            setattr(ProgressDisplay, name, hook)
        InteractiveShell.clear_instance()
        socket.close(linger=0)
