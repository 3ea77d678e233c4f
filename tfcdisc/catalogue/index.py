"""Offset index of a BSON catalogue: one pass, then random access and exact shards.

The index holds, per document, its int64 byte offset and length, ``_id``,
``category_id`` (-1 in unlabelled files) and image count, in a columnar ``.npz``
(about 30 bytes a product: 200 MB for the real train.bson). It is written beside
the BSON (``train.bson.idx.npz``) or, if that folder is read-only, in a local cache,
and reused while the BSON's size, modification time and head/tail checksum are
unchanged. Shards are contiguous runs of documents balanced by bytes, so parallel
and Beam workers cover every product exactly once.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import logging
import os
import zipfile
import zlib
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, bsonfile, paths, problems

FORMAT_VERSION = 2  # 2: labelled by all documents, bad-document bytes
ARRAYS = ("offsets", "lengths", "product_ids", "category_ids", "num_images")  # per document
_FINGERPRINT_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Shard:
    """Documents [lo, hi) of the index, stored in bytes [start, end) of the file."""

    lo: int
    hi: int
    start: int
    end: int

    @property
    def num_products(self) -> int:
        return self.hi - self.lo


@dataclasses.dataclass(eq=False)
class OffsetIndex:
    """Where each product of one BSON file lies, and what was skipped building it."""

    path: str
    offsets: np.ndarray  # int64
    lengths: np.ndarray  # int32
    product_ids: np.ndarray  # int64
    category_ids: np.ndarray  # int64, -1 where absent
    num_images: np.ndarray  # int32: a BSON document may hold any number of images
    labeled: bool
    fingerprint: dict
    bad_documents: int = 0
    skipped_bytes: int = 0
    problems: list = dataclasses.field(default_factory=list)
    stored_at: str | None = None  # where load_or_build read or wrote it
    bad_document_bytes: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_images_total(self) -> int:
        return int(self.num_images.sum(dtype=np.int64))

    def positions(self, lo: int, hi: int) -> Shard:
        """The documents at index positions [lo, hi)."""
        if hi <= lo:
            start = int(self.offsets[lo]) if lo < len(self) else self.fingerprint["size"]
            return Shard(lo, lo, start, start)
        return Shard(lo, hi, int(self.offsets[lo]),
                     int(self.offsets[hi - 1]) + int(self.lengths[hi - 1]))

    def shard(self, i: int, n: int) -> Shard:
        """The i-th of n contiguous shards of about equal bytes; together they cover all."""
        if not 0 <= i < n:
            raise ValueError(f"shard {i} of {n}: need 0 <= i < n")
        if not len(self):
            return Shard(0, 0, 0, 0)
        first = int(self.offsets[0])
        total = int(self.offsets[-1]) + int(self.lengths[-1]) - first
        cut = lambda k: int(np.searchsorted(self.offsets, first + total * k // n))  # noqa: E731
        return self.positions(cut(i), len(self) if i == n - 1 else cut(i + 1))

    def byte_range(self, start: int, end: int) -> Shard:
        """The documents whose first byte lies in [start, end), for arbitrary ranges."""
        lo, hi = np.searchsorted(self.offsets, [start, end])
        return self.positions(int(lo), int(hi))

    def iter_products(self, shard: Shard | None = None, source=None
                      ) -> Iterator[bsonfile.Product]:
        """Streams the shard's products (all by default), exactly those in the index.

        Documents the index left out (bad ones and duplicates skipped in "skip" mode)
        are passed over here too: they were counted when the index was built.
        """
        shard = shard or self.positions(0, len(self))
        if not shard.num_products:
            return
        expected = self.offsets[shard.lo:shard.hi].tolist()
        ids = self.product_ids[shard.lo:shard.hi].tolist()
        cids = self.category_ids[shard.lo:shard.hi].tolist()
        clean = not (self.bad_documents or self.skipped_bytes)
        k = 0
        for product in bsonfile.iter_products(
                source if source is not None else self.path, start=shard.start, end=shard.end,
                first_position=shard.lo, labeled=self.labeled,
                errors="strict" if clean else "skip"):
            if k < len(expected) and product.offset == expected[k]:
                cid = -1 if product.category_id is None else product.category_id
                if product.product_id != ids[k] or cid != cids[k]:
                    break
                k += 1
                yield product
        if k != len(expected):
            raise bsonfile.BsonFormatError(
                self.path, int(expected[k]), f"product _id {ids[k]} (category {cids[k]}) "
                "listed in the index was not found there", position=shard.lo + k,
                advice=f"the file changed since its index was built; delete the index file "
                f"({self.stored_at or default_index_path(self.path)}) so it is rebuilt")


# --------------------------------------------------------------------------- build


def fingerprint(path: str) -> dict:
    """Size, modification time and a checksum of the head and tail of the file."""
    info = tf.io.gfile.stat(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(_FINGERPRINT_BYTES)
        if info.length > 2 * _FINGERPRINT_BYTES:
            f.seek(info.length - _FINGERPRINT_BYTES)
        tail = f.read()
    return {"size": int(info.length), "mtime_nsec": int(info.mtime_nsec),
            "crc32": zlib.crc32(head + tail)}


def build(path: str, *, errors: str = "strict",
          progress: Callable[[int], None] | None = None) -> OffsetIndex:
    """Scans the file once, reading only headers, and validates every document.

    Args:
      path: BSON file (local or gs://).
      errors: "strict" raises `bsonfile.BsonFormatError` on the first problem,
        including a duplicate ``_id``; "skip" leaves bad documents and later
        duplicates out of the index and counts them.
      progress: called with the byte offset reached, now and then.
    """
    fp = fingerprint(path)
    piece = scan_range(path, 0, None, errors=errors, progress=progress)
    index = join(path, fp, [piece], errors)
    if progress:
        progress(fp["size"])
    return index


def scan_range(path: str, start: int, end: int | None, *, errors: str = "strict",
               progress: Callable[[int], None] | None = None) -> dict:
    """Indexes the documents whose first byte lies in [start, end), an arbitrary byte
    range: reading begins at the first document at or after ``start``
    (`bsonfile.first_document`). Returns a piece for `join`, with where reading began
    (``first``) and stopped (``stop``: the next document's start, at or past ``end``),
    so that `join` can check that neighbouring pieces meet.
    """
    stats = bsonfile.ReadStats()
    first = bsonfile.first_document(path, start)
    offsets, lengths = array.array("q"), array.array("i")
    pids, cids, nimgs = array.array("q"), array.array("q"), array.array("i")
    next_report = 0
    stop = first
    if end is None or first < end:
        for docs in bsonfile.iter_documents(path, start=first, end=end, labeled=None,
                                            errors=errors, stats=stats):
            for offset, length, doc in docs:
                offsets.append(offset)
                lengths.append(length)
                pids.append(doc["_id"])
                cids.append(doc.get("category_id", -1))
                nimgs.append(len(doc["imgs"]))
            if progress and docs and docs[-1][0] >= next_report:
                progress(docs[-1][0])
                next_report = docs[-1][0] + (64 << 20)
        stop = stats.end_offset
    return {"first": first, "stop": stop,
            "offsets": np.frombuffer(offsets, np.int64), "lengths": np.frombuffer(lengths, np.int32),
            "product_ids": np.frombuffer(pids, np.int64),
            "category_ids": np.frombuffer(cids, np.int64),
            "num_images": np.frombuffer(nimgs, np.int32),
            "bad_documents": stats.bad_documents, "skipped_bytes": stats.skipped_bytes,
            "bad_document_bytes": stats.bad_document_bytes, "problems": list(stats.problems)}


def join(path: str, fp: dict, pieces: list[dict], errors: str) -> OffsetIndex | None:
    """One index from the pieces of consecutive byte ranges covering the file, then the
    whole-file checks (labels, duplicate ids). None if the pieces do not meet: a range
    reader that began at a false document start (then index the file in one pass)."""
    expected = 0
    for piece in pieces:
        if piece["first"] != expected:
            logging.warning("%s: a range reader began at byte %d, its neighbour stopped at "
                            "%d", path, piece["first"], expected)
            return None
        expected = piece["stop"]
    if expected != fp["size"]:
        logging.warning("%s: the range readers stopped at byte %d of %d", path, expected,
                        fp["size"])
        return None
    cat = lambda key: np.concatenate([p[key] for p in pieces])  # noqa: E731
    listed: list = []
    problems.extend(listed, (tuple(x) for p in pieces for x in p["problems"]))
    index = OffsetIndex(
        path, cat("offsets"), cat("lengths"), cat("product_ids"), cat("category_ids"),
        cat("num_images"), False, fp, sum(p["bad_documents"] for p in pieces),
        sum(p["skipped_bytes"] for p in pieces), listed,
        bad_document_bytes=sum(p["bad_document_bytes"] for p in pieces))
    _check_labels(index, errors)
    _check_duplicates(index, errors)
    return index


def _drop(index: OffsetIndex, drop: np.ndarray, problem: Callable[[int], str]) -> None:
    """Leaves documents out of the index ("skip" mode), counted as bad documents."""
    problems.extend(index.problems, ((int(index.offsets[j]), problem(int(j)))
                                     for j in np.flatnonzero(drop)[:problems.LISTED]))
    index.bad_documents += int(drop.sum())
    index.bad_document_bytes += int(index.lengths[drop].sum(dtype=np.int64))
    for name in ARRAYS:
        setattr(index, name, getattr(index, name)[~drop])


def _check_labels(index: OffsetIndex, errors: str) -> None:
    """A file is labelled if its documents are: all of them, not the first one. A mixed
    file is refused (or, in "skip" mode, its minority kind is left out and counted)."""
    has_label = index.category_ids >= 0
    labelled = int(has_label.sum())
    index.labeled = bool(len(index)) and labelled * 2 >= len(index)
    minority = ~has_label if index.labeled else has_label
    count = int(minority.sum())
    if not count:
        return
    kind = "without" if index.labeled else "with"
    j = int(np.argmax(minority))
    problem = (f"a mixed file: {count} of {len(index)} documents {kind} 'category_id' "
               f"(the first is this one), the rest {'with' if index.labeled else 'without'}")
    if errors == "strict":
        raise bsonfile.BsonFormatError(
            index.path, int(index.offsets[j]), problem, position=j,
            product_id=int(index.product_ids[j]),
            advice=f"a training file labels every product, a test file none: fix those "
            f"{count} documents, or rerun with errors='skip' to leave them out and count them")
    _drop(index, minority, lambda j: f"document {kind} 'category_id' in a file whose other "
          f"documents are {'labelled' if index.labeled else 'unlabelled'} (_id "
          f"{int(index.product_ids[j])}), skipped")


def _check_duplicates(index: OffsetIndex, errors: str) -> None:
    order = np.argsort(index.product_ids, kind="stable")
    sorted_ids = index.product_ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1]) + 1
    if not len(dup):
        return
    later = order[dup]  # with a stable sort, the first occurrence is kept
    if errors == "strict":
        j = int(later.min())
        first = int(order[np.searchsorted(sorted_ids, index.product_ids[j])])
        raise bsonfile.BsonFormatError(
            index.path, int(index.offsets[j]),
            f"duplicate _id {int(index.product_ids[j])}: also at byte offset "
            f"{int(index.offsets[first])} (document #{first}); {len(dup)} duplicates in all",
            position=j, product_id=int(index.product_ids[j]),
            advice="remove the duplicates, or rerun with errors='skip' to keep the first of "
            "each and count the rest")
    drop = np.zeros(len(index), bool)
    drop[later] = True
    _drop(index, drop, lambda j: f"duplicate _id {int(index.product_ids[j])} skipped")


# --------------------------------------------------------------------------- storage


def save(index: OffsetIndex, index_path: str) -> None:
    """Writes the index atomically (`tfcdisc.catalogue.atomic`)."""
    meta = {"version": FORMAT_VERSION, "path": index.path, "labeled": index.labeled,
            "fingerprint": index.fingerprint, "bad_documents": index.bad_documents,
            "skipped_bytes": index.skipped_bytes, "problems": index.problems,
            "bad_document_bytes": index.bad_document_bytes}
    atomic.write_arrays(index_path, meta, **{k: getattr(index, k) for k in ARRAYS})


def load(index_path: str, path: str | None = None) -> OffsetIndex:
    data = atomic.read_arrays(index_path)
    meta = data["meta"]
    if meta["version"] != FORMAT_VERSION:
        raise ValueError(f"{index_path}: index format {meta['version']}, expected "
                         f"{FORMAT_VERSION}; delete it so it is rebuilt")
    return OffsetIndex(path or meta["path"], data["offsets"], data["lengths"],
                       data["product_ids"], data["category_ids"], data["num_images"],
                       meta["labeled"], meta["fingerprint"], meta["bad_documents"],
                       meta["skipped_bytes"], [tuple(p) for p in meta["problems"]],
                       bad_document_bytes=meta.get("bad_document_bytes", 0))


def default_index_path(path: str) -> str:
    return path + ".idx.npz"


def _cache_path(path: str) -> str:
    root = os.environ.get("TFCDISC_CACHE", os.path.expanduser("~/.cache/tfcdisc"))
    return os.path.join(root, hashlib.sha1(path.encode()).hexdigest()[:16] + ".idx.npz")


def load_or_build(path: str, *, index_path: str | None = None, errors: str = "strict",
                  progress: Callable[[int], None] | None = None) -> OffsetIndex:
    """Returns the file's index, reusing a stored one while the file is unchanged.

    Without ``index_path`` the index is kept beside the BSON (``train.bson.idx.npz``)
    or, where that folder is read-only, in a local cache. With ``index_path`` (say a
    gs:// folder that Beam workers can read) a fresh index beside the BSON is still
    reused, but a new one is written only to ``index_path``. The result's
    ``stored_at`` says where it lives.

    An index built in "skip" mode that skipped something is not reused in "strict"
    mode: the first recorded problem is raised instead, as a fresh build would.
    """
    index = load_stored(path, index_path=index_path, errors=errors)
    if index is None:
        index = build(path, errors=errors, progress=progress)
        store(index, index_path)
    return index


def _places(path: str, index_path: str | None) -> tuple[list[str], list[str]]:
    if index_path:
        return [index_path, default_index_path(path)], [index_path]
    places = [default_index_path(path), _cache_path(path)]
    return places, places


def load_stored(path: str, *, index_path: str | None = None, errors: str = "strict"
                ) -> OffsetIndex | None:
    """The stored index of an unchanged file (see `load_or_build`), or None."""
    paths.check_input_file(path)
    fp = fingerprint(path)
    for candidate in _places(path, index_path)[0]:
        if not tf.io.gfile.exists(candidate):
            continue
        try:
            index = load(candidate, path)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile,
                tf.errors.OpError) as e:  # truncated, foreign or old: rebuilt
            logging.warning("ignoring unreadable index %s (%s)", candidate, e)
            continue
        if index.fingerprint != fp:
            logging.info("index %s is stale (the BSON changed); rebuilding", candidate)
            continue
        covered = (int(index.lengths.sum(dtype=np.int64)) + index.bad_document_bytes
                   + index.skipped_bytes)
        if covered != fp["size"]:  # a damaged or forged index would drop products
            logging.warning("ignoring index %s: its documents and skipped bytes cover %d "
                            "bytes of the %d in %s; rebuilding", candidate, covered,
                            fp["size"], path)
            continue
        if errors == "strict" and index.problems:
            offset, problem = index.problems[0]
            raise bsonfile.BsonFormatError(path, int(offset), problem,
                                           advice="rerun with errors='skip' to skip and count")
        index.stored_at = candidate
        return index
    return None


def store(index: OffsetIndex, index_path: str | None = None) -> None:
    """Saves a new index where `load_stored` looks first and can write; sets stored_at."""
    for candidate in _places(index.path, index_path)[1]:
        try:
            parent = os.path.dirname(candidate)
            if parent:
                tf.io.gfile.makedirs(parent)
            save(index, candidate)
            index.stored_at = candidate
            return
        except (OSError, tf.errors.OpError) as e:
            logging.warning("cannot write index %s (%s); trying the next place", candidate, e)
