"""One writer per folder: a model dir's training, an export, a fusion dir, a data dir's build.

Two writers into one folder interleave their files (two trainings wrote one history.csv
with two headers; two builds mixed their splits), so the second is refused at once,
naming the holder. The lock is a small JSON file beside what it guards, naming its holder
(command, host, pid, since) and a heartbeat the holder refreshes while it runs.

Local files (and FUSE mounts such as Colab's Drive) are also locked by the kernel
(``flock``), held for the holder's life: taking a lock, and taking over one whose holder
is gone, happen under it, so of any number of simultaneous writers exactly one wins. A
lock the kernel no longer holds is taken over with a warning when its holder was a
process of this host, or when its heartbeat is older than the lease (``lease_minutes``):
a recycled Colab VM finds its predecessor's lock on Drive, naming another host, and
resumes after the lease. Garbage in a lock file (a half-written or foreign file) is taken
over too; a folder where the lock belongs is named.

Cloud Storage has no exclusive create: there the lock is written and read back, and
two writers starting in the same instant may both pass; any later one is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from tfcdisc.settings.fields import DEFAULT_LEASE_MINUTES

_HELD: dict[str, int] = {}  # lock paths this process holds, with their nesting depth


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


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "a writer"
    return (f"{holder.get('what', 'a tfcdisc command')} (host {holder.get('host')}, "
            f"pid {holder.get('pid')}, since {holder.get('since')})")


def _busy(folder: str, holder: dict | None, path: str | None = None,
          lease_minutes: float | None = None) -> FolderBusyError:
    """The refusal a writer gets while ``holder`` writes; with ``path``, when and how a
    lock whose holder is gone stops refusing."""
    gone = (f" (if that process is gone, its lock {path} is taken over after "
            f"{lease_minutes:g} min without a heartbeat, or delete it)" if path else "")
    return FolderBusyError(f"{folder} is being written by {_holder_text(holder)}; wait for "
                           f"it to finish, or choose another folder{gone}")


def _is(holder: dict | None, me: dict) -> bool:
    return bool(holder) and (holder.get("host"), holder.get("pid")) == (me["host"], me["pid"])


def _parse(text: bytes | str) -> dict | None:
    """The holder a lock file names, or None for garbage (empty, half-written, foreign)."""
    try:
        holder = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _stale(holder: dict | None, modified: float, host: str, lease_minutes: float) -> str | None:
    """Why a lock no live holder keeps (the kernel's lock is free, or Cloud Storage) may be
    taken over, or None where its holder may still be writing."""
    if holder is None:
        return "its lock file holds no holder (garbage or half-written)"
    if holder.get("host") == host:
        pid = holder.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return "no longer running"
        return None
    beat = holder.get("heartbeat")
    last = beat if isinstance(beat, (int, float)) else modified
    idle = time.time() - last
    if idle > lease_minutes * 60:
        return (f"silent for {idle / 60:.1f} min, past the {lease_minutes:g}-minute lease "
                "(--lock_lease_minutes)")
    return None


class _Lock:
    """A held lock: its file, and the heartbeat that keeps it from being taken over."""

    def __init__(self, path: str, me: dict, fd: int | None):
        self.path, self.me, self.fd = path, me, fd

    def beat(self) -> None:
        """Rewrites the lock with a fresh heartbeat."""
        data = json.dumps({**self.me, "heartbeat": time.time()}).encode()
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)
        else:
            import tensorflow as tf
            with tf.io.gfile.GFile(self.path, "wb") as f:
                f.write(data)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while the kernel lock is held: no one else is here
            os.close(self.fd)  # releases the kernel lock
            return
        import tensorflow as tf
        try:
            with tf.io.gfile.GFile(self.path, "rb") as f:
                holder = _parse(f.read())
        except tf.errors.NotFoundError:
            return
        if _is(holder, self.me):
            with contextlib.suppress(tf.errors.NotFoundError):
                tf.io.gfile.remove(self.path)


def _take_local(path: str, folder: str, me: dict, lease_minutes: float) -> _Lock:
    import fcntl
    for _ in range(20):  # a holder releasing between our open and our lock: try again
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise FolderBusyError(f"{path} is a folder where {folder}'s lock file belongs; "
                                  "delete it if no tfcdisc command is writing there") from None
        except OSError as e:  # read-only, no permission
            raise _not_writable(folder, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            free = False
        except OSError:  # a file system without kernel locks: the heartbeat alone decides
            free = True
        else:
            free = True
        if not free:
            with open(path, "rb") as f:
                holder = _parse(f.read())
            os.close(fd)
            raise _busy(folder, holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the file we locked was released and removed meanwhile
            os.close(fd)
            continue
        data = os.pread(fd, 1 << 16, 0)
        if data:  # not a file we just created: its holder is gone (the kernel lock was free)
            holder = _parse(data)
            why = _stale(holder, os.fstat(fd).st_mtime, me["host"], lease_minutes)
            if why is None:
                os.close(fd)
                raise _busy(folder, holder, path, lease_minutes)
            logging.warning("%s: taking over the lock of %s: %s", folder,
                            _holder_text(holder), why)
        lock = _Lock(path, me, fd)
        try:
            lock.beat()
        except OSError as e:
            os.close(fd)
            raise _not_writable(folder, e) from None
        return lock
    raise FolderBusyError(f"{folder}: its lock {path} kept changing hands; try again")


def _take_remote(path: str, folder: str, me: dict, lease_minutes: float) -> _Lock:
    import tensorflow as tf
    lock = _Lock(path, me, None)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            holder = _parse(f.read())
        modified = tf.io.gfile.stat(path).mtime_nsec / 1e9
        why = _stale(holder, modified, me["host"], lease_minutes)
        if why is None:
            raise _busy(folder, holder, path, lease_minutes)
        logging.warning("%s: taking over the lock of %s: %s", folder, _holder_text(holder),
                        why)
    try:
        lock.beat()
    except tf.errors.OpError as e:  # a bucket this account may only read
        raise _not_writable(folder, e) from None
    with tf.io.gfile.GFile(path, "rb") as f:  # read back: the last writer wins
        holder = _parse(f.read())
    if not _is(holder, me):
        raise _busy(folder, holder)
    return lock


def _heartbeat(lock: _Lock, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            lock.beat()
        except Exception as e:  # noqa: BLE001 - a missed beat only shortens the lease
            logging.warning("%s: could not refresh the lock (%s)", lock.path, e)


@contextlib.contextmanager
def hold(lock_path: str, what: str, folder: str | None = None,
         lease_minutes: float = DEFAULT_LEASE_MINUTES):
    """Holds ``lock_path`` while the block runs, refreshing its heartbeat; ``what`` names
    the writer in the refusal another process gets (``folder``: what to name as guarded,
    default the lock's own). A lock of another host silent for ``lease_minutes`` is
    taken over.

    Raises:
      FolderNotWritableError: the folder cannot be created or written.
      FolderBusyError: a live process (or one on another host within its lease) holds
        it; the message names the folder, the holder and what to do.
    """
    folder = folder or os.path.dirname(lock_path)
    if _HELD.get(lock_path):  # this very process holds it already (a nested call)
        _HELD[lock_path] += 1
        try:
            yield
        finally:
            _HELD[lock_path] -= 1
        return
    local = "://" not in lock_path
    try:
        if local:
            os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        else:
            import tensorflow as tf
            tf.io.gfile.makedirs(os.path.dirname(lock_path))
    except Exception as e:  # noqa: BLE001 - OSError locally, tf.errors.OpError remotely
        raise _not_writable(folder, e) from None
    me = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    take = _take_local if local else _take_remote
    lock = take(lock_path, folder, me, lease_minutes)
    _HELD[lock_path] = 1
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(lock, max(lease_minutes * 15, 1.0), stop),
                             daemon=True, name="tfcdisc-lock-heartbeat")
    beats.start()
    try:
        yield
    finally:
        stop.set()
        beats.join()
        _HELD.pop(lock_path, None)
        lock.release()
