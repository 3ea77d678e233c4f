"""Ctrl-C and SIGTERM: at once outside TensorFlow's loops, at the next safe point inside
them, at once again on a second signal. Run in a child process: a test runner's worker
may run tests outside the main thread, or with these signals blocked."""

import subprocess
import sys

from conftest import REPO

_CHILD = r"""
import os, signal
from tfcdisc.catalogue import stops
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)
said = []
with stops.handled():
    try:  # outside a loop: at once
        os.kill(os.getpid(), signal.SIGTERM)
        said.append("not raised")
    except stops.Terminated:
        said.append("term at once")
    try:
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised
            said.append("deferred")
            stops.check()
    except stops.Terminated:
        said.append("wrong kind")
    except KeyboardInterrupt:
        said.append("int at check")
    try:
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
            said.append("not raised")
    except KeyboardInterrupt:
        said.append("second at once")
    stops.check()  # nothing left pending
    try:
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        said.append("not raised")
    except stops.Terminated:
        said.append("term on leaving")
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
print(" | ".join(said))
"""


def test_a_stop_waits_for_a_safe_point_inside_a_loop_and_not_twice():
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(" | ") == ["term at once", "deferred", "int at check",
                                        "second at once", "term on leaving\n"]
    assert "Ctrl-C again stops at once" in done.stderr
