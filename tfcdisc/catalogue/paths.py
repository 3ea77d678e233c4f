"""Checks of the paths a command is given, made before anything heavy is imported.

A mistaken flag (a missing file, a folder where a file belongs, an output nobody can
write) is refused in a fraction of a second instead of after TensorFlow's start-up, and
the library makes the same checks for Python callers. Local paths are checked with the
os module; gs:// and other remote paths through ``tf.io.gfile``, imported only then.
"""

from __future__ import annotations

import os
import stat
import tempfile


def _remote(path: str) -> bool:
    return "://" in path


def exists(path: str) -> bool:
    if _remote(path):
        import tensorflow as tf
        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if _remote(path):
        import tensorflow as tf
        return tf.io.gfile.isdir(path)
    return os.path.isdir(path)


def open_binary(path: str):
    """A binary file object for reading, local or remote."""
    if _remote(path):
        import tensorflow as tf
        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb")


def check_input_file(path: str) -> None:
    """Refuses what cannot be indexed: a missing path, a folder, a pipe or a device
    (indexing needs a file it can read twice and seek in)."""
    if not exists(path):
        if not _remote(path) and os.path.islink(path):
            raise FileNotFoundError(f"{path}: a symbolic link that leads nowhere (a loop, or "
                                    "its target is gone); link it to the real file")
        raise FileNotFoundError(f"{path}: no such file; check the path (local or gs://)")
    if isdir(path):
        raise ValueError(f"{path} is a folder; give the BSON file in it (e.g. "
                         f"{path.rstrip('/')}/train.bson)")
    if not _remote(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file (a pipe or a device, as `<(...)` "
                         "gives): copy it to a file first")


def check_output(path: str, flag: str = "--output") -> None:
    """Refuses, before any work, an output that is a folder, in a folder that does not
    exist, or in one this process cannot write in."""
    if isdir(path):
        raise ValueError(f"{flag}={path} is a folder; give a file name inside it")
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not path.startswith("gs://") and not isdir(parent):
        raise ValueError(f"{flag}={path}: the folder {parent} does not exist; create it or "
                         "fix the path")
    if not _remote(path):  # a read-only folder or a full disk: said now, not after the work
        try:
            with tempfile.NamedTemporaryFile(dir=parent or ".", prefix=".tfcdisc-probe-") as f:
                f.write(b"x")
                f.flush()
        except OSError as e:
            raise ValueError(f"{flag}={path}: cannot write in {parent or '.'} "
                             f"({e.strerror}); choose a writable folder") from None


def resolved(path: str) -> str:
    """A path as the file system sees it: links followed, ``..`` gone (remote: as given).
    Writers replace what a link points to, never the link (a Drive folder linked in)."""
    return path.rstrip("/") if _remote(path) else os.path.realpath(path)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_apart(outputs: dict[str, str], inputs: dict[str, str],
                replaced: dict[str, str] | None = None) -> None:
    """Refuses an output that would overwrite an input: the same file after links are
    resolved, a file already inside an input folder (an export's own file), or, for an
    output folder ``replaced`` whole (an export dir), one holding an input; and two
    outputs that are one file. ``predict --output=test.bson`` replaced the test set, exit 0.

    Raises:
      ValueError: naming both flags and the fix.
    """
    seen: dict[str, str] = {}
    for out_flag, out in outputs.items():
        target = resolved(out)
        if target in seen:
            raise ValueError(f"{out_flag}={out} is also {seen[target]}: one would overwrite "
                             "the other; give each output its own file")
        seen[target] = f"{out_flag}"
        for in_flag, source in inputs.items():
            src = resolved(source)
            if target == src or (out_flag in (replaced or {}) and _within(src, target)) or (
                    _within(target, src) and exists(out) and not isdir(out)):
                raise ValueError(
                    f"{out_flag}={out} would overwrite the input {in_flag}={source}; "
                    "write the output somewhere else")
