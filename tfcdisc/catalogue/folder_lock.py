"""One writer per folder: a model dir's training, an export, a fusion dir, a data dir's build.

Two writers into one folder interleave their files (two trainings wrote one history.csv
with two headers; two builds mixed their splits), so the second is refused at once,
naming the holder. The lock is a small JSON file created exclusively (``O_EXCL``) beside
what it guards; a lock left by a dead process of this host is taken over with a warning.
On Cloud Storage, which has no exclusive create, the lock is written and read back: two
writers starting in the same instant may both pass, any later one is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

import tensorflow as tf

from tfcdisc.catalogue import atomic


class FolderBusyError(ValueError):
    """Another process is writing the folder."""


class FolderNotWritableError(ValueError):
    """The folder cannot be written (read-only, no permission): said before any work."""


def _not_writable(folder: str, error: Exception) -> FolderNotWritableError:
    reason = getattr(error, "strerror", None) or getattr(error, "message", None) or str(error)
    return FolderNotWritableError(
        f"{folder}: cannot write there ({reason}); give a folder this user can write, or "
        "fix its permissions or mount")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _holder_text(holder: dict) -> str:
    return (f"{holder.get('what', 'a tfcdisc command')} (host {holder.get('host')}, "
            f"pid {holder.get('pid')}, since {holder.get('since')})")


def _read(path: str) -> dict:
    return atomic.read_json(path) or {}  # absent, empty or half-written: no holder


@contextlib.contextmanager
def hold(lock_path: str, what: str, folder: str | None = None):
    """Holds ``lock_path`` while the block runs; ``what`` names the writer in the refusal
    another process gets (``folder``: what to name as guarded, default the lock's own).

    Raises:
      FolderNotWritableError: the folder cannot be created or written.
      FolderBusyError: a live process (or one on another host) holds it; the message
        names the folder, the holder and, for a holder that is gone, the file to delete.
    """
    folder = folder or os.path.dirname(lock_path)
    try:
        tf.io.gfile.makedirs(os.path.dirname(lock_path))
    except (OSError, tf.errors.OpError) as e:
        raise _not_writable(folder, e) from None
    me = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    text = json.dumps(me)
    local = "://" not in lock_path
    for attempt in range(2):
        if local:
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as e:  # read-only, no permission
                raise _not_writable(folder, e) from None
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                break
        elif not tf.io.gfile.exists(lock_path):
            try:
                with tf.io.gfile.GFile(lock_path, "w") as f:
                    f.write(text)
            except tf.errors.OpError as e:  # a bucket this account may only read
                raise _not_writable(folder, e) from None
            if _read(lock_path) == me:
                break
        holder = _read(lock_path)
        if (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"]):
            yield  # this very process holds it already (a nested call)
            return
        stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
            and not pid_alive(holder["pid"])
        if attempt == 0 and (stale or not holder):
            logging.warning("%s: taking over the lock of %s, which is no longer running",
                            folder, _holder_text(holder) if holder else "a writer")
            with contextlib.suppress(tf.errors.NotFoundError, FileNotFoundError):
                tf.io.gfile.remove(lock_path)
            continue
        raise FolderBusyError(
            f"{folder} is being written by {_holder_text(holder)}; wait for it to finish, "
            f"or choose another folder (if that process is gone, delete {lock_path})")
    try:
        yield
    finally:
        if _read(lock_path) == me:
            with contextlib.suppress(tf.errors.NotFoundError, FileNotFoundError):
                tf.io.gfile.remove(lock_path)
