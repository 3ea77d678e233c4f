"""Files replaced whole or not at all, local or gs://: one helper for every writer.

A file is written under a temporary name beside it and renamed over the real one only
once complete, so a reader sees the old file or the whole new one. An exception removes
the temporary file; a SIGKILL cannot be caught, so long writes that must leave nothing
behind (predict's rows, checkpoints) go to a local temporary file first (`via_local`) and
are then `copy`-ed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from typing import Iterator

import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import paths


@contextlib.contextmanager
def writing(path: str, mode: str = "wb") -> Iterator:
    """A file object whose content replaces ``path`` when the block ends without error
    (through a symbolic link: its target is replaced, the link stays)."""
    path = paths.resolved(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with tf.io.gfile.GFile(tmp, mode) as f:
            yield f
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)


def write(path: str, data: bytes | str) -> None:
    with writing(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def read_json(path: str) -> dict | None:
    """A small JSON file (a lock, a cache key), or None where it is absent or damaged:
    callers that can start afresh treat both alike."""
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())
    except (tf.errors.NotFoundError, json.JSONDecodeError):
        return None


def load_json(path: str, missing: str | None, damaged: str,
              name: str | None = None) -> dict | None:
    """A JSON file a reader cannot do without (a run's config, an export's metadata).

    Returns None where it is absent and ``missing`` is None; otherwise raises
    FileNotFoundError(``missing``) for an absent file and ValueError naming the file (or
    ``name``), the parse error and ``damaged`` (what to do) for a damaged one.
    """
    if not tf.io.gfile.exists(path):
        if missing is None:
            return None
        raise FileNotFoundError(missing)
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name or path} is damaged ({e}); {damaged}") from None


def sha256(path: str) -> str:
    """The SHA-256 of a file (local or gs://), read 16 MB at a time."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_arrays(path: str, meta: dict | None = None, **arrays: np.ndarray) -> None:
    """Named arrays (and a JSON-able ``meta``) as one .npz, written atomically: the
    offset index, its Beam pieces and the build's members files."""
    if meta is not None:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write(path, buf.getvalue())


def read_arrays(path: str) -> dict:
    """What `write_arrays` wrote: the arrays by name, ``meta`` decoded (if any)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()))
        out = {k: data[k] for k in data.files}
    if "meta" in out:
        out["meta"] = json.loads(out["meta"].tobytes())
    return out


@contextlib.contextmanager
def _in_temporary_folder(path: str) -> Iterator[None]:
    """A full temporary folder named as such: a small $TMPDIR was reported as the
    destination's fault (or as a traceback)."""
    try:
        yield
    except (OSError, tf.errors.ResourceExhaustedError) as e:
        full = isinstance(e, tf.errors.ResourceExhaustedError) or e.errno in (
            errno.ENOSPC, errno.EDQUOT)
        if not full:
            raise
        raise OSError(errno.ENOSPC, f"no space left in the temporary folder "
                      f"{tempfile.gettempdir()}, which {path} passes through; free space there "
                      "or set TMPDIR to a folder on a bigger disk") from None


@contextlib.contextmanager
def via_local(path: str) -> Iterator[str]:
    """A local temporary path of the same name for a writer that needs a real file (Keras,
    HDF5, TFRecord, pandas): what it leaves there replaces ``path`` (local or gs://) whole
    once the block ends without error (`copy`); if it wrote nothing, nothing is copied.
    A full disk inside a library's own write cannot leave ``path`` half-written."""
    with tempfile.TemporaryDirectory(prefix="tfcdisc-") as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
        with _in_temporary_folder(path):
            yield local
        if os.path.exists(local):
            copy(local, path)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local copy of ``path`` (local or gs://) for a reader that needs a real file
    (Keras, zipfile), removed after the block."""
    with tempfile.TemporaryDirectory(prefix="tfcdisc-") as tmp:
        local = os.path.join(tmp, os.path.basename(path.rstrip("/")))
        with _in_temporary_folder(path):
            tf.io.gfile.copy(path, local)
        yield local


def copy(local: str, path: str) -> None:
    """Copies a finished local file over ``path``."""
    with writing(path) as f, open(local, "rb") as src:
        while chunk := src.read(64 << 20):
            f.write(chunk)
