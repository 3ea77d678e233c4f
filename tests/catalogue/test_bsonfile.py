"""The streaming BSON reader: round trips, legal variations, ranges and every bad input."""

import io
import random

import bson
import pytest
from bson.int64 import Int64

from conftest import doc, write
from tfcdisc.catalogue import bsonfile
from tfcdisc.catalogue import index as index_lib
from tfcdisc.catalogue.bsonfile import BsonFormatError


def _read(source, **kw):
    stats = bsonfile.ReadStats()
    products = list(bsonfile.iter_products(source, stats=stats, **kw))
    return products, stats


def test_matches_pymongo_decode_file_iter(catalogue):
    folder, _ = catalogue
    for name, labeled in (("train.bson", True), ("test.bson", False)):
        path = str(folder / name)
        with open(path, "rb") as f:
            expected = [(d["_id"], d.get("category_id"), [i["picture"] for i in d["imgs"]])
                        for d in bson.decode_file_iter(f)]
        products, stats = _read(path)
        assert [(p.product_id, p.category_id, p.images) for p in products] == expected
        assert stats.documents == len(expected) and stats.bad_documents == 0
        assert all((p.category_id is not None) == labeled for p in products)


def test_reads_file_objects_and_reports_offsets(tmp_path):
    data = doc(1) + doc(2, n_images=3) + doc(5)
    products, _ = _read(io.BytesIO(data))
    assert [p.product_id for p in products] == [1, 2, 5]
    assert [p.offset for p in products] == [0, len(doc(1)), len(doc(1)) + len(doc(2, n_images=3))]
    assert [len(p.images) for p in products] == [1, 3, 1]


def test_legal_variations(tmp_path):
    extra_img = bson.encode({"_id": 3, "imgs": [{"picture": b"abc", "width": 180, "h": 1.5}],
                             "category_id": 1000000100})
    path = write(tmp_path,
                 doc(Int64(2**40), Int64(1000000100)),  # int64 ids
                 doc(2**40 + 1, name="Chaise", price=12.5, tags=["a", {"b": 1}]),  # extra fields
                 extra_img,
                 doc(7, imgs=[{"picture": bson.Binary(b"xyz", 128)}]))  # other binary subtype
    products, _ = _read(path)
    assert [p.product_id for p in products] == [2**40, 2**40 + 1, 3, 7]
    assert products[2].images == [b"abc"] and products[3].images == [b"xyz"]
    assert all(type(i) is bytes for p in products for i in p.images)


def test_unlabelled_file_and_forced_labels(tmp_path):
    path = write(tmp_path, doc(1, cid=None), doc(2, cid=None), name="test.bson")
    products, _ = _read(path)
    assert [p.category_id for p in products] == [None, None]
    with pytest.raises(BsonFormatError, match="missing 'category_id'"):
        _read(path, labeled=True)
    labelled = write(tmp_path, doc(1), doc(2))
    assert [p.category_id for p in _read(labelled, labeled=False)[0]] == [None, None]


def test_byte_ranges_cover_every_document_once(tmp_path):
    docs = [doc(i, n_images=1 + i % 4) for i in range(50)]
    path = write(tmp_path, *docs)
    offsets = [sum(map(len, docs[:i])) for i in range(len(docs))]
    cuts = [0, offsets[7], offsets[8], offsets[30], sum(map(len, docs))]
    got = []
    for a, b in zip(cuts, cuts[1:]):
        got += [p.product_id for p in bsonfile.iter_products(path, start=a, end=b)]
    assert got == list(range(50))


def test_memory_is_bounded_by_a_chunk(catalogue, monkeypatch):
    folder, _ = catalogue
    monkeypatch.setattr(bsonfile, "CHUNK_BYTES", 64 * 1024)
    path = str(folder / "train.bson")
    sizes = [len(b.buf) for b in bsonfile.iter_batches(path)]
    assert len(sizes) > 10  # the file was read in many chunks, never whole
    assert max(sizes) <= 2 * 64 * 1024


# --------------------------------------------------------------------------- bad input

def _corrupt_prefix(d: bytes, value: int) -> bytes:
    return value.to_bytes(4, "little", signed=True) + d[4:]


FRAMING_CASES = {
    "length_zero": (lambda d: _corrupt_prefix(d, 0), "corrupt length prefix 0"),
    "length_negative": (lambda d: _corrupt_prefix(d, -7), "corrupt length prefix -7"),
    "length_over_16MiB": (lambda d: _corrupt_prefix(d, 17 << 20), "over MongoDB's 16 MiB"),
    "length_past_eof": (lambda d: _corrupt_prefix(d, 1 << 20), "runs past the end of the file"),
    "missing_terminator": (lambda d: d[:-1] + b"\x01", "missing its terminating byte"),
}


@pytest.mark.parametrize("case", sorted(FRAMING_CASES))
def test_corrupt_framing_stops_or_resynchronises(tmp_path, case):
    corrupt, message = FRAMING_CASES[case]
    d1, d2, d3 = doc(1), doc(2, n_images=2), doc(3)
    path = write(tmp_path, d1, corrupt(d2), d3)
    with pytest.raises(BsonFormatError) as e:
        _read(path)
    assert e.value.offset == len(d1) and e.value.position == 1
    assert message in str(e.value) and path in str(e.value)
    assert f"byte offset {len(d1)}" in str(e.value) and "errors='skip'" in str(e.value)
    products, stats = _read(path, errors="skip")
    assert [p.product_id for p in products] == [1, 3]
    assert stats.skipped_bytes == len(d2)
    assert stats.problems[0][0] == len(d1) and message in stats.problems[0][1]


def test_truncated_inside_length_prefix(tmp_path):
    d1, d2 = doc(1), doc(2)
    path = write(tmp_path, d1, d2, doc(3)[:3])
    with pytest.raises(BsonFormatError, match="ends inside a length prefix") as e:
        _read(path)
    assert e.value.offset == len(d1) + len(d2) and e.value.position == 2
    products, stats = _read(path, errors="skip")
    assert len(products) == 2 and stats.skipped_bytes == 3


def test_truncated_inside_document(tmp_path):
    d1, d2 = doc(1), doc(2, n_images=4)
    path = write(tmp_path, d1, d2[:-10])
    with pytest.raises(BsonFormatError, match="runs past the end of the file") as e:
        _read(path)
    assert e.value.offset == len(d1)
    products, stats = _read(path, errors="skip")
    assert [p.product_id for p in products] == [1] and stats.skipped_bytes == len(d2) - 10


def test_random_garbage(tmp_path):
    garbage = random.Random(3).randbytes(5000)
    path = write(tmp_path, garbage)
    with pytest.raises(BsonFormatError) as e:
        _read(path)
    assert e.value.offset == 0 and "corrupt length prefix" in str(e.value)
    products, stats = _read(path, errors="skip")
    assert products == [] and stats.skipped_bytes == 5000 and stats.bad_documents == 0
    # Garbage between good documents loses only itself, and every byte of it is counted.
    path = write(tmp_path, doc(1), garbage, doc(2), name="mixed.bson")
    products, stats = _read(path, errors="skip")
    assert [p.product_id for p in products] == [1, 2]
    assert stats.skipped_bytes == 5000 and stats.problems[0][0] == len(doc(1))


CONTENT_CASES = {
    "missing_id": (dict(_id=None), "missing '_id'"),
    "id_not_integer": (dict(_id="abc"), "'_id' is not an integer"),
    "imgs_missing": (dict(imgs=None), "missing 'imgs'"),
    "imgs_empty": (dict(imgs=[]), "'imgs' is empty"),
    "imgs_not_list": (dict(imgs="picture"), "'imgs' is not a list"),
    "imgs_entry_not_document": (dict(imgs=[b"jpeg"]), "entry 0 is not a {picture: bytes}"),
    "picture_missing": (dict(imgs=[{"image": b"x"}]), "entry 0 has no 'picture'"),
    "picture_not_bytes": (dict(imgs=[{"picture": b"x"}, {"picture": "text"}]),
                          "entry 1: 'picture' is not binary data"),
    "category_missing": (dict(category_id=None), "missing 'category_id' in a labelled"),
    "category_not_integer": (dict(category_id="1000"), "'category_id' is not an integer"),
}


@pytest.mark.parametrize("case", sorted(CONTENT_CASES))
def test_invalid_documents_raise_or_are_counted(tmp_path, case):
    fields, message = CONTENT_CASES[case]
    d1, d2 = doc(1), doc(2, **fields)
    path = write(tmp_path, d1, d2, doc(3))
    with pytest.raises(BsonFormatError) as e:
        _read(path, labeled=True)
    text = str(e.value)
    assert message in text and path in text and f"byte offset {len(d1)}" in text
    assert "document #1" in text and "errors='skip'" in text
    products, stats = _read(path, errors="skip", labeled=True)
    assert [p.product_id for p in products] == [1, 3]
    assert stats.bad_documents == 1 and stats.bad_document_bytes == len(d2)
    assert stats.problems[0][0] == len(d1) and stats.problems[0][1].startswith(e.value.problem)


def test_invalid_bson_inside_a_document_is_named(tmp_path):
    d2 = bytearray(doc(2, n_images=2))
    d2[4] = 0x55  # an element type that does not exist
    path = write(tmp_path, doc(1), bytes(d2), doc(3))
    with pytest.raises(BsonFormatError, match="invalid BSON") as e:
        _read(path)
    assert e.value.offset == len(doc(1)) and e.value.position == 1
    products, stats = _read(path, errors="skip")
    # Bytes that do not decode cannot be trusted to end where their prefix says: they
    # are passed over to the next document that parses, and counted as skipped bytes.
    assert [p.product_id for p in products] == [1, 3] and stats.skipped_bytes == len(d2)


def _accounted(path, products, stats) -> int:
    with open(path, "rb") as f:
        data = f.read()
    lengths = (int.from_bytes(data[p.offset:p.offset + 4], "little") for p in products)
    return sum(lengths) + stats.bad_document_bytes + stats.skipped_bytes


@pytest.mark.parametrize("where", ["zero_inside_later_document", "inside_next_document",
                                   "past_the_end", "shorter_on_a_zero"])
def test_skip_accounting_covers_every_byte(tmp_path, where):
    """Products + bad documents + skipped bytes add up to the whole file, whatever a
    corrupt length prefix points at (a 400-product file once gave 398 + 1 + 0)."""
    docs = [doc(i, n_images=1 + i % 3) for i in range(1, 401)]
    blob = b"".join(docs)
    at = sum(map(len, docs[:100]))  # document #100's length prefix is corrupted
    if where == "past_the_end":
        length = len(blob) - at + 1000
    else:
        lo = at + (len(docs[100]) + 20 if where != "shorter_on_a_zero" else 30)
        hi = at + (len(docs[100]) + len(docs[101]) + len(docs[102])
                   if where == "zero_inside_later_document" else len(docs[100]) + 40)
        if where == "shorter_on_a_zero":
            hi = at + len(docs[100]) - 2
        length = next(j for j in range(lo, hi) if blob[j] == 0) - at + 1
    bad = bytearray(blob)
    bad[at:at + 4] = length.to_bytes(4, "little")
    path = write(tmp_path, bytes(bad))
    products, stats = _read(path, errors="skip")
    assert _accounted(path, products, stats) == len(blob)
    assert len(products) == 399 and [p.product_id for p in products][99:101] == [100, 102]
    index = index_lib.build(path, errors="skip")
    assert (int(index.lengths.sum()) + index.bad_document_bytes + index.skipped_bytes
            == len(blob))


def test_a_file_is_labelled_by_its_documents_not_its_first(tmp_path):
    """One unlabelled document first no longer makes a training file unlabelled, nor one
    labelled document first a test file labelled; a mixed file names its minority."""
    train = [doc(i) for i in range(1, 101)]
    train[0] = doc(1, category_id=None)
    path = write(tmp_path, *train)
    with pytest.raises(BsonFormatError) as e:
        index_lib.build(path)
    assert e.value.offset == 0 and e.value.product_id == 1 and "1 of 100" in str(e.value)
    assert "without 'category_id'" in str(e.value)
    index = index_lib.build(path, errors="skip")
    assert index.labeled and len(index) == 99 and index.bad_documents == 1
    test = [doc(i, category_id=None) for i in range(1, 101)]
    test[0] = doc(1)
    path = write(tmp_path, *test, name="test.bson")
    with pytest.raises(BsonFormatError, match="1 of 100 documents with 'category_id'") as e:
        index_lib.build(path)
    assert e.value.position == 0
    index = index_lib.build(path, errors="skip")
    assert not index.labeled and len(index) == 99
    assert [p.product_id for p in index.iter_products()] == list(range(2, 101))


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.bson"):
        list(bsonfile.iter_products("/no/such/dir/nope.bson"))


def test_errors_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="errors must be"):
        list(bsonfile.iter_products(write(tmp_path, doc(1)), errors="ignore"))
