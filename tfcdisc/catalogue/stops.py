"""Ctrl-C and SIGTERM as ordinary stops: raised where Python runs next, or, inside
TensorFlow's loops, at the next safe point.

A KeyboardInterrupt raised at an arbitrary bytecode may land inside a Python callback
that TensorFlow's C++ fast path makes (`TensorShape.__len__` while a tf.data iterator is
created): the process then segfaults, aborts on a corrupted heap, or swallows the
interrupt and trains on (seen about one time in three when Ctrl-C met the start of an
epoch). So while `deferred` is active (a training loop, a prediction loop) the first
signal is only recorded and `check`, called between steps, raises it; a second one
raises at once, as an impatient user expects. Outside it, both raise at once, as Python's
own Ctrl-C does. Main thread only; a forked worker (a pool's) ends on SIGTERM as ever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (a preemption notice, `kill`, a notebook's stop button), unwinding like
    Ctrl-C: locks released, temporary files removed, nothing half-written kept."""


_deferring = 0  # nesting depth of `deferred`
_pending: int | None = None  # a signal recorded while deferring


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` and Ctrl-C `KeyboardInterrupt` (at once, or at
    the next `check` under `deferred`). A Ctrl-C that the process ignores (a job started
    in the background) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        global _pending
        if os.getpid() != owner:  # a forked worker: SIGTERM ends it, Ctrl-C is its parent's
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if _deferring and _pending is None:
            _pending = signum
            print("stopping after the current step (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)
            return
        _pending = None  # a second signal: this one, at once
        raise _exception(signum)

    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        wanted.append(signal.SIGINT)
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: a first signal waits for `check` (call it between steps); leaving the
    block with one pending raises it there."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()


def check() -> None:
    """Raises the signal recorded under `deferred`, if any."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise _exception(signum)
