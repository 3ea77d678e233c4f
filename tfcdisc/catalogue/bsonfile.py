"""Streaming reader and validator for Cdiscount-style BSON catalogues.

A catalogue file is a plain concatenation of BSON documents
``{_id: int, category_id: int, imgs: [{picture: <JPEG bytes>}, ...]}``; extra fields,
and extra keys beside ``picture``, are legal and ignored. This is the only module
that knows that layout.

How it stays fast: Python only frames documents (one length prefix each) inside
large chunks; pymongo's C decoder decodes a whole chunk of framed documents in one
call; a small validator checks the decoded fields. Only when the C decoder rejects a
chunk are its documents decoded one by one, to name the bad one.

Error policy, for every reader here:
  * ``errors="strict"`` (default): the first problem raises `BsonFormatError`, which
    names the file, the byte offset, the document's position and what to do.
  * ``errors="skip"``: a document that decodes but is not a valid product is skipped
    and counted (with its bytes); after a corrupt length prefix, or bytes that do not
    decode (a prefix may land on a 0x00 inside a later document), the reader
    resynchronises at the next document that parses as a product and counts the bytes
    it skipped. Valid products + bad documents + skipped bytes cover the whole file.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO, Iterator

import bson
import tensorflow as tf
from bson.errors import InvalidBSON

from tfcdisc.catalogue import problems

# MongoDB's maximum document size; Cdiscount documents are far smaller.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MIN_DOCUMENT_BYTES = 5
CHUNK_BYTES = 256 * 1024  # larger reads thrash malloc beside the decoder: 2-4x slower here
_INT32 = struct.Struct("<i")
_ADVICE_DOC = ("fix or remove this document, or rerun with errors='skip' "
               "(inspect: --errors=skip) to skip and count bad documents")
_ADVICE_FRAME = ("nothing after this offset can be trusted: rerun with errors='skip' "
                 "(inspect: --errors=skip) to resynchronise at the next valid document and "
                 "count the bytes skipped, or restore the file from a good copy")


class BsonFormatError(ValueError):
    """A catalogue file that cannot be read as it is; says where and what to do."""

    def __init__(self, path: str, offset: int, problem: str, *,
                 position: int | None = None, product_id: int | None = None,
                 advice: str = ""):
        self.path, self.offset, self.problem = path, offset, problem
        self.position, self.product_id = position, product_id
        where = f"{path}: byte offset {offset}"
        if position is not None:
            where += f" (document #{position}"
            where += f", _id {product_id})" if product_id is not None else ")"
        super().__init__(f"{where}: {problem}" + (f". {advice}" if advice else ""))
        self.advice = advice

    def __reduce__(self):  # so that worker processes can send it back whole
        return (_rebuild_error, (self.path, self.offset, self.problem, self.position,
                                 self.product_id, self.advice))


def _rebuild_error(path, offset, problem, position, product_id, advice) -> BsonFormatError:
    return BsonFormatError(path, offset, problem, position=position, product_id=product_id,
                           advice=advice)


@dataclasses.dataclass(slots=True)
class Product:
    """One catalogue product. ``category_id`` is None in unlabelled (test) files."""

    product_id: int
    category_id: int | None
    images: list[bytes]
    offset: int


@dataclasses.dataclass
class ReadStats:
    """What a read saw, including everything it skipped: nothing is dropped silently."""

    documents: int = 0  # decoded documents, valid or not
    bad_documents: int = 0
    bad_document_bytes: int = 0
    skipped_bytes: int = 0  # bytes passed over to resynchronise (no document there)
    problems: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    end_offset: int | None = None  # where a finished read stopped: the next document's start

    def record(self, offset: int, problem: str) -> None:
        problems.note(self.problems, (offset, problem))

    def merge(self, other: "ReadStats") -> None:
        self.documents += other.documents
        self.bad_documents += other.bad_documents
        self.bad_document_bytes += other.bad_document_bytes
        self.skipped_bytes += other.skipped_bytes
        problems.extend(self.problems, other.problems)


# --------------------------------------------------------------------------- validation


def product_problem(doc: dict, labeled: bool | None) -> str | None:
    """Why a decoded document is not a valid product, or None if it is.

    ``labeled``: True requires an integer ``category_id``, False ignores it, None
    accepts a document with or without one (but not a non-integer one).
    """
    pid = doc.get("_id")
    if pid is None:
        return "missing '_id'"
    if not isinstance(pid, int) or isinstance(pid, bool):
        return f"'_id' is not an integer ({type(pid).__name__})"
    imgs = doc.get("imgs")
    if imgs is None:
        return "missing 'imgs'"
    if type(imgs) is not list:
        return f"'imgs' is not a list ({type(imgs).__name__})"
    if not imgs:
        return "'imgs' is empty"
    for i, img in enumerate(imgs):
        if type(img) is not dict:
            return f"'imgs' entry {i} is not a {{picture: bytes}} document"
        picture = img.get("picture")
        if picture is None:
            return f"'imgs' entry {i} has no 'picture'"
        if not isinstance(picture, bytes):
            return f"'imgs' entry {i}: 'picture' is not binary data ({type(picture).__name__})"
    cid = doc.get("category_id")
    if cid is None:
        if labeled:
            return "missing 'category_id' in a labelled (training) file"
    elif labeled is not False and (not isinstance(cid, int) or isinstance(cid, bool)):
        return f"'category_id' is not an integer ({type(cid).__name__})"
    elif labeled is not False and cid < 0:  # -1 would read as "no category" downstream
        return f"'category_id' {cid} is not a valid category id (ids are non-negative)"
    return None


# --------------------------------------------------------------------------- framing


def file_size(path: str) -> int:
    return tf.io.gfile.stat(path).length


def _open(source) -> tuple[BinaryIO, str, int | None, bool]:
    """Opens a path through tf.io.gfile (so gs:// works) or takes a binary file object."""
    if isinstance(source, str) or hasattr(source, "__fspath__"):
        path = str(source)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{path}: no such file; check the path (local or gs://)")
        return tf.io.gfile.GFile(path, "rb"), path, file_size(path), True
    name = source_name(source)
    try:
        here = source.tell()
        size = source.seek(0, 2)
        source.seek(here)
    except (AttributeError, OSError, ValueError):
        size = None
    return source, name, size, False


@dataclasses.dataclass
class Batch:
    """Consecutive well-framed documents: ``buf[starts[i]:ends[i]]`` is document i."""

    buf: bytes
    starts: list[int]
    ends: list[int]
    base: int  # file offset of buf[0]
    first_position: int
    docs: list[dict] | None = None  # decoded, when iter_batches(decode=True)

    def offset(self, i: int) -> int:
        return self.base + self.starts[i]


class _Window:
    """A sliding window over a file: ``buf[pos:]`` is unread; ``base`` is buf[0]'s offset."""

    def __init__(self, f: BinaryIO, start: int):
        self.f, self.buf, self.base, self.pos, self.eof = f, b"", start, 0, False

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def available(self) -> int:
        return len(self.buf) - self.pos

    def fill(self, n: int) -> bool:
        """Makes n bytes available at pos (this may move buf); False if the file ends."""
        while len(self.buf) - self.pos < n and not self.eof:
            more = self.f.read(max(CHUNK_BYTES, n - (len(self.buf) - self.pos)))
            if not more:
                self.eof = True
                break
            self.buf = self.buf[self.pos:] + more
            self.base += self.pos
            self.pos = 0
        return len(self.buf) - self.pos >= n

    def framing_problem(self, length: int) -> str | None:
        """Checks the document whose length prefix (already read) is at pos."""
        if length < MIN_DOCUMENT_BYTES:
            return f"corrupt length prefix {length} (a document has at least 5 bytes)"
        if length > MAX_DOCUMENT_BYTES:
            return f"corrupt length prefix {length} (over MongoDB's 16 MiB limit)"
        if not self.fill(length):
            return (f"length prefix {length} runs past the end of the file "
                    f"({self.available()} bytes left): truncated file or corrupt prefix")
        if self.buf[self.pos + length - 1] != 0:
            return f"document of {length} bytes is missing its terminating byte"
        return None

    def resynchronise(self) -> None:
        """Moves pos to the next offset where a whole product document parses, or to EOF.

        Candidates are found by the ``_id`` element that MongoDB and pymongo write
        first in every document.
        """
        self.pos += 1
        while True:
            hit = self.buf.find(b"_id\x00", self.pos + 5)
            if hit < 0:
                self.pos = max(self.pos, len(self.buf) - 8)  # a candidate may straddle chunks
                if not self.fill(self.available() + 1):
                    self.pos = len(self.buf)
                    return
                continue
            self.pos = hit - 5
            if self._plausible():
                return
            self.pos += 1

    def _plausible(self) -> bool:
        if not self.fill(5) or self.buf[self.pos + 4] not in (0x10, 0x12):
            return False
        length = _INT32.unpack_from(self.buf, self.pos)[0]
        if self.framing_problem(length):
            return False
        try:
            doc = bson.decode(self.buf[self.pos:self.pos + length])
        except (InvalidBSON, ValueError, OverflowError):
            return False
        return product_problem(doc, labeled=False) is None


_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"7z\xbc\xaf\x27\x1c": "7z",
          b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_UNPACK = {"gzip": "gunzip FILE", "zip": "unzip FILE", "7z": "7z x FILE",
           "bzip2": "bunzip2 FILE", "xz": "unxz FILE", "zstd": "unzstd FILE"}


def compressed_kind(head: bytes) -> str | None:
    """The archive or compression format whose magic bytes ``head`` starts with, if any
    (Kaggle ships its files zipped or 7-zipped). A BSON document may start with the
    same bytes by chance; callers check that it does not frame as one too."""
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def iter_batches(source, *, start: int = 0, end: int | None = None, first_position: int = 0,
                 errors: str = "strict", stats: ReadStats | None = None,
                 decode: bool = False) -> Iterator[Batch]:
    """Frames every document whose first byte lies in [start, end), a chunk at a time.

    ``start`` must be a document boundary (0, or an offset from the index). Memory is
    bounded by one chunk (256 KiB) plus one document (at most 16 MiB). With ``decode``
    each batch carries its decoded documents, and bytes that frame but do not decode
    are treated like a corrupt length prefix (raised, or resynchronised past).
    """
    if errors not in ("strict", "skip"):
        raise ValueError(f"errors must be 'strict' or 'skip', not {errors!r}")
    f, path, size, owned = _open(source)
    stats = stats if stats is not None else ReadStats()
    limit = end if end is not None else (size if size is not None else float("inf"))
    position = first_position
    unpack = _INT32.unpack_from
    try:
        if start:
            f.seek(start)
        w = _Window(f, start)
        if not start:
            _refuse_compressed(w, path)
        stats.end_offset = None
        while w.offset < limit:
            buf = w.buf
            starts, ends, pos = _frame(buf, w.pos, min(len(buf), limit - w.base))
            if starts:
                docs, bad, problem = _decode(buf, starts, ends) if decode else (None, None, "")
                if bad is not None and errors == "strict":
                    raise BsonFormatError(path, w.base + starts[bad], problem,
                                          position=position + bad, advice=_ADVICE_DOC)
                good = len(starts) if bad is None else bad
                if good:
                    yield Batch(buf, starts[:good], ends[:good], w.base, position,
                                docs and docs[:good])
                    stats.documents += good
                    position += good
                if bad is None:
                    w.pos = pos
                    continue
                w.pos = starts[bad]
                _resynchronise(w, stats, problem)
                continue
            # The next document is not complete in the window: read more, or report.
            offset = w.offset
            if not w.fill(4):
                trailing = w.available()
                if not trailing:
                    stats.end_offset = w.offset
                    return
                problem = f"file ends inside a length prefix ({trailing} trailing bytes)"
                if errors == "strict":
                    raise BsonFormatError(path, offset, problem, position=position,
                                          advice="the file is truncated; " + _ADVICE_FRAME)
                stats.skipped_bytes += trailing
                stats.record(offset, problem)
                stats.end_offset = w.offset + trailing
                return
            length = unpack(w.buf, w.pos)[0]
            problem = w.framing_problem(length)
            if problem is None:
                continue  # fill() brought the rest of the document in
            if errors == "strict":
                raise BsonFormatError(path, offset, problem, position=position,
                                      advice=_ADVICE_FRAME)
            _resynchronise(w, stats, problem)
        stats.end_offset = w.offset
    finally:
        if owned:
            f.close()


def _frame(buf, pos: int, room: int) -> tuple[list[int], list[int], int]:
    """The complete documents in ``buf`` from ``pos`` (starting before ``room``), framed
    in a tight loop: their starts and ends, and where the next begins."""
    unpack, stop = _INT32.unpack_from, len(buf)
    starts, ends = [], []
    while pos + 4 <= stop and pos < room:
        length = unpack(buf, pos)[0]
        nxt = pos + length
        if length < MIN_DOCUMENT_BYTES or nxt > stop or buf[nxt - 1] != 0:
            break
        starts.append(pos)
        ends.append(nxt)
        pos = nxt
    return starts, ends, pos


def _refuse_compressed(w: _Window, path: str) -> None:
    """A gzip, zip... file given as BSON is named at byte 0 (it does not frame as BSON)."""
    if w.fill(6) and (kind := compressed_kind(bytes(w.buf[:6]))) and \
            w.framing_problem(_INT32.unpack_from(w.buf, 0)[0]) is not None:
        raise BsonFormatError(path, 0, f"this is a {kind} file, not BSON", position=0,
                              advice=f"decompress it first ({_UNPACK[kind]}) and give the "
                              ".bson inside")


def _resynchronise(w: _Window, stats: ReadStats, problem: str) -> None:
    """Skips from the window's position to the next document that parses, counted."""
    offset = w.offset
    w.resynchronise()
    skipped = w.offset - offset
    stats.skipped_bytes += skipped
    stats.record(offset, f"{problem}; skipped {skipped} bytes to resynchronise")


# --------------------------------------------------------------------------- decoding


def source_name(source) -> str:
    return str(source) if isinstance(source, str) or hasattr(source, "__fspath__") else str(
        getattr(source, "name", "<file object>"))


def _decode(buf: bytes, starts: list[int], ends: list[int]
            ) -> tuple[list[dict], int | None, str]:
    """Decodes framed documents with one C call; if that fails, one by one, to find the
    first that does not decode: (documents, its index or None, the problem)."""
    try:
        return bson.decode_all(memoryview(buf)[starts[0]:ends[-1]]), None, ""
    except (InvalidBSON, ValueError, OverflowError):
        pass
    docs = []
    for i, (a, b) in enumerate(zip(starts, ends)):
        try:
            docs.append(bson.decode(buf[a:b]))
        except (InvalidBSON, ValueError, OverflowError) as e:
            return docs, i, f"invalid BSON ({e})"
    return docs, None, ""


def iter_documents(source, *, start: int = 0, end: int | None = None, first_position: int = 0,
                   labeled: bool | None = None, errors: str = "strict",
                   stats: ReadStats | None = None) -> Iterator[list[tuple[int, int, dict]]]:
    """Yields, a chunk at a time, [(offset, length, document), ...] of valid products.

    ``labeled`` is checked per document (`product_problem`): with None a document may
    carry ``category_id`` or not, and whether a whole file is labelled is decided from
    all of them (`tfcdisc.catalogue.index`), never from the first. Invalid documents raise or are
    counted (``errors``). Lists per chunk keep the per-document cost to a plain loop.
    """
    stats = stats if stats is not None else ReadStats()
    path = source_name(source)
    for batch in iter_batches(source, start=start, end=end, first_position=first_position,
                              errors=errors, stats=stats, decode=True):
        valid = []
        starts, ends, base = batch.starts, batch.ends, batch.base
        for i, doc in enumerate(batch.docs):
            problem = product_problem(doc, labeled)
            if problem is None:
                valid.append((base + starts[i], ends[i] - starts[i], doc))
                continue
            pid = doc.get("_id") if isinstance(doc.get("_id"), int) else None
            if errors == "strict":
                raise BsonFormatError(path, base + starts[i], problem,
                                      position=batch.first_position + i, product_id=pid,
                                      advice=_ADVICE_DOC)
            stats.bad_documents += 1
            stats.bad_document_bytes += ends[i] - starts[i]
            stats.record(base + starts[i], problem + (f" (_id {pid})" if pid is not None else ""))
        yield valid


def iter_products(source, *, start: int = 0, end: int | None = None, first_position: int = 0,
                  labeled: bool | None = None, errors: str = "strict",
                  stats: ReadStats | None = None) -> Iterator[Product]:
    """Streams validated products from a path (local or gs://) or binary file object.

    Args:
      source: a path or a readable binary file object.
      start, end: read the documents whose first byte lies in [start, end); ``start``
        must be a document boundary (take it from `tfcdisc.catalogue.index.OffsetIndex`).
      first_position: the position of the document at ``start``, for messages.
      labeled: whether every product must carry ``category_id`` (a training file).
        False yields ``category_id=None``; None yields each document's own (or None).
      errors: "strict" raises on the first problem; "skip" skips and counts.
      stats: filled with counts of what was read and skipped.

    Yields:
      `Product`s in file order; memory is bounded by one chunk plus one document.
    """
    for docs in iter_documents(
            source, start=start, end=end, first_position=first_position, labeled=labeled,
            errors=errors, stats=stats):
        for offset, _, doc in docs:
            yield _product(doc, labeled, offset)


def _product(doc: dict, labeled: bool | None, offset: int) -> Product:
    """A validated document as a `Product` (``labeled=False`` drops the category)."""
    cid = doc.get("category_id") if labeled is not False else None
    return Product(int(doc["_id"]), None if cid is None else int(cid),
                   [bytes(img["picture"]) for img in doc["imgs"]], offset)


def first_document(source, start: int) -> int:
    """The offset of the first whole product document at or after byte ``start`` (the
    file size if there is none): where a reader of an arbitrary byte range begins.

    Found as `iter_batches` resynchronises after corrupt bytes, so a reader that starts
    here and one that framed its way from the file's start agree (`tfcdisc.catalogue.index`
    checks that they meet).
    """
    f, _, size, owned = _open(source)
    try:
        if start <= 0:
            return 0
        f.seek(start)
        w = _Window(f, start)
        if w._plausible():
            return start
        w.resynchronise()
        return w.offset
    finally:
        if owned:
            f.close()


def iter_products_at(source, offsets, lengths, *, labeled: bool | None = None,
                     expect: tuple | None = None, span_bytes: int = 8 << 20
                     ) -> Iterator[Product]:
    """Reads the documents at given offsets (ascending), and only those.

    For a shard's members taken from an offset index: documents close together are
    read in one request of at most ``span_bytes`` (a 2% sample is a few seeks, a
    contiguous run one stream), so a reader touches its members, not the file.

    Args:
      source: a path (local or gs://) or binary file object.
      offsets, lengths: the documents, in ascending offset order.
      labeled: as in `iter_products`.
      expect: (product_ids, category_ids) the index recorded for them, -1 for no
        category; a document that differs means the file changed since it was indexed.
    """
    f, path, _, owned = _open(source)
    offsets = [int(o) for o in offsets]
    lengths = [int(n) for n in lengths]
    try:
        i = 0
        while i < len(offsets):
            j = i + 1
            while (j < len(offsets) and offsets[j] - offsets[i] + lengths[j] <= span_bytes
                   and offsets[j] - (offsets[j - 1] + lengths[j - 1]) < CHUNK_BYTES):
                j += 1
            base = offsets[i]
            f.seek(base)
            buf = f.read(offsets[j - 1] + lengths[j - 1] - base)
            for k in range(i, j):
                a = offsets[k] - base
                doc, problem = None, None
                if len(buf) < a + lengths[k] or _INT32.unpack_from(buf, a)[0] != lengths[k]:
                    problem = f"no document of {lengths[k]} bytes here"
                else:
                    try:
                        doc = bson.decode(buf[a:a + lengths[k]])
                        problem = product_problem(doc, labeled)
                    except (InvalidBSON, ValueError, OverflowError) as e:
                        problem = f"invalid BSON ({e})"
                if problem is None and expect is not None:
                    cid = doc.get("category_id", -1)
                    if doc["_id"] != expect[0][k] or (labeled is not False
                                                       and cid != expect[1][k]):
                        problem = (f"found _id {doc['_id']} (category {cid}) where the index "
                                   f"has _id {expect[0][k]} (category {expect[1][k]})")
                if problem is not None:
                    raise BsonFormatError(
                        path, offsets[k], problem, advice="the file changed since its index "
                        "was built: delete the index (.idx.npz) so it is rebuilt")
                yield _product(doc, labeled, offsets[k])
            i = j
    finally:
        if owned:
            f.close()
