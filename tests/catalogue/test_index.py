"""Offset index: same products as the stream, exact shards, storage and reuse."""

import os

import numpy as np
import pytest

from conftest import doc, write
from tfcdisc.catalogue import bsonfile
from tfcdisc.catalogue import index as index_lib
from tfcdisc.catalogue.bsonfile import BsonFormatError


def test_index_matches_stream(catalogue):
    folder, _ = catalogue
    for name in ("train.bson", "test.bson"):
        path = str(folder / name)
        idx = index_lib.build(path)
        products = list(bsonfile.iter_products(path))
        assert idx.product_ids.tolist() == [p.product_id for p in products]
        assert idx.offsets.tolist() == [p.offset for p in products]
        assert idx.num_images.tolist() == [len(p.images) for p in products]
        assert idx.labeled == (name == "train.bson")
        if idx.labeled:
            assert idx.category_ids.tolist() == [p.category_id for p in products]
        else:
            assert (idx.category_ids == -1).all()
        assert idx.offsets.dtype == np.int64 and idx.product_ids.dtype == np.int64
        ends = idx.offsets + idx.lengths
        assert ends[-1] == os.path.getsize(path) and (ends[:-1] == idx.offsets[1:]).all()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 500])
def test_shards_cover_every_product_exactly_once(catalogue, n):
    folder, _ = catalogue
    idx = index_lib.build(str(folder / "train.bson"))
    shards = [idx.shard(i, n) for i in range(n)]
    ids = [p.product_id for s in shards for p in idx.iter_products(s)]
    assert ids == idx.product_ids.tolist()
    assert sum(s.num_products for s in shards) == len(idx)
    if n <= len(idx) // 10:  # balanced by bytes
        sizes = [s.end - s.start for s in shards]
        assert max(sizes) < 1.5 * (sum(sizes) / n) + idx.lengths.max()


def test_byte_range_takes_documents_starting_inside(catalogue):
    folder, _ = catalogue
    idx = index_lib.build(str(folder / "train.bson"))
    size = idx.fingerprint["size"]
    cuts = sorted({0, size, *np.random.default_rng(0).integers(0, size, 9).tolist()})
    ids = [p.product_id for a, b in zip(cuts, cuts[1:]) for p in idx.iter_products(
        idx.byte_range(a, b))]
    assert ids == idx.product_ids.tolist()
    with pytest.raises(ValueError):
        idx.shard(3, 3)


def test_stored_index_is_reused_while_the_file_is_unchanged(tmp_path, monkeypatch):
    path = write(tmp_path, *[doc(i) for i in range(20)])
    first = index_lib.load_or_build(path)
    assert os.path.exists(path + ".idx.npz")
    calls = []
    real_build = index_lib.build
    monkeypatch.setattr(index_lib, "build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = index_lib.load_or_build(path)
    assert calls == [] and again.product_ids.tolist() == first.product_ids.tolist()
    # Appending a product changes size and checksum: the index is rebuilt.
    with open(path, "ab") as f:
        f.write(doc(99))
    rebuilt = index_lib.load_or_build(path)
    assert calls == [1] and rebuilt.product_ids.tolist()[-1] == 99


def test_index_falls_back_to_cache_when_the_folder_is_not_writable(tmp_path, monkeypatch):
    path = write(tmp_path, doc(1), doc(2))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(index_lib, "default_index_path", lambda p: str(blocker / "x.idx.npz"))
    idx = index_lib.load_or_build(path)
    cached = index_lib._cache_path(path)
    assert os.path.exists(cached) and len(idx) == 2
    assert index_lib.load(cached).product_ids.tolist() == [1, 2]


def test_duplicate_ids_raise_or_keep_the_first(tmp_path):
    d = [doc(1), doc(2), doc(3), doc(2, cid=1000000200), doc(4)]
    path = write(tmp_path, *d)
    with pytest.raises(BsonFormatError, match="duplicate _id 2") as e:
        index_lib.build(path)
    offset2 = len(d[0])
    offset_dup = sum(map(len, d[:3]))
    assert e.value.offset == offset_dup and f"also at byte offset {offset2}" in str(e.value)
    assert "document #3" in str(e.value)
    idx = index_lib.build(path, errors="skip")
    assert idx.product_ids.tolist() == [1, 2, 3, 4] and idx.bad_documents == 1
    assert idx.category_ids[1] == 1000000100  # the first occurrence is kept
    assert [p.product_id for p in idx.iter_products()] == [1, 2, 3, 4]


def test_skip_mode_index_records_problems_and_strict_reuse_raises(tmp_path):
    path = write(tmp_path, doc(1), doc(2, imgs=[]), doc(3))
    idx = index_lib.load_or_build(path, errors="skip")
    assert idx.product_ids.tolist() == [1, 3] and idx.bad_documents == 1
    assert [p.product_id for p in idx.iter_products()] == [1, 3]
    with pytest.raises(BsonFormatError, match="'imgs' is empty"):
        index_lib.load_or_build(path)


def test_changed_file_under_an_old_index_is_detected(tmp_path):
    path = write(tmp_path, doc(1), doc(2), doc(3))
    idx = index_lib.build(path)
    write(tmp_path, doc(1), doc(3), doc(4))
    with pytest.raises(BsonFormatError, match="changed since its index was built"):
        list(idx.iter_products())


def _same_index(a, b):
    for name in ("offsets", "lengths", "product_ids", "category_ids", "num_images"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name
    assert (a.labeled, a.bad_documents, a.skipped_bytes, a.bad_document_bytes) == (
        b.labeled, b.bad_documents, b.skipped_bytes, b.bad_document_bytes)


def _corrupt_file(tmp_path):
    """400 products; document #100's length prefix points into #101, and #250 does not
    decode: both are resynchronised past in "skip" mode."""
    docs = [doc(i, n_images=1 + i % 3) for i in range(1, 401)]
    blob = bytearray(b"".join(docs))
    at = sum(map(len, docs[:100]))
    blob[at:at + 4] = (len(docs[100]) + 40).to_bytes(4, "little")
    at = sum(map(len, docs[:250]))
    blob[at + 4] = 0x7F  # not a BSON element type
    return write(tmp_path, bytes(blob))


@pytest.mark.parametrize("range_bytes", [700, 4096, 10**9])
def test_byte_range_pieces_join_into_the_one_pass_index(catalogue, tmp_path, range_bytes):
    """Ranges cut anywhere (inside documents, smaller than a document) join into what
    one pass gives, for a clean file and a corrupt one read in "skip" mode."""
    folder, _ = catalogue
    for path, errors in ((str(folder / "train.bson"), "strict"),
                         (_corrupt_file(tmp_path), "skip")):
        fp = index_lib.fingerprint(path)
        cuts = list(range(0, fp["size"], range_bytes)) + [fp["size"]]
        pieces = [index_lib.scan_range(path, a, b, errors=errors)
                  for a, b in zip(cuts[:-1], cuts[1:])]
        joined = index_lib.join(path, fp, pieces, errors)
        whole = index_lib.build(path, errors=errors)
        _same_index(joined, whole)
        assert len(whole.problems) == (2 if errors == "skip" else 0)


def test_pieces_that_do_not_meet_are_refused(catalogue):
    folder, _ = catalogue
    path = str(folder / "train.bson")
    fp = index_lib.fingerprint(path)
    half = fp["size"] // 2
    a, b = (index_lib.scan_range(path, 0, half), index_lib.scan_range(path, half, None))
    b["first"] += 1  # as if the second reader had begun at a false document start
    assert index_lib.join(path, fp, [a, b], "strict") is None


def test_beam_indexing_matches_and_reports_problems_at_their_offset(catalogue, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from tfcdisc.catalogue import beam_index
    import shutil
    folder, _ = catalogue
    clean = str(shutil.copy(folder / "test.bson", tmp_path))  # no index beside it yet
    corrupt = _corrupt_file(tmp_path)
    options = PipelineOptions(["--runner=DirectRunner"])
    stores = [str(tmp_path / "work" / "clean.idx.npz"), str(tmp_path / "work" / "bad.idx.npz")]
    got = beam_index.index_files([clean, corrupt], stores, errors="skip",
                                 beam_options=options, range_bytes=3000)
    _same_index(got[clean], index_lib.build(clean))
    _same_index(got[corrupt], index_lib.build(corrupt, errors="skip"))
    assert sorted(os.listdir(tmp_path / "work")) == ["bad.idx.npz", "clean.idx.npz"]
    assert index_lib.load_stored(clean, index_path=stores[0]) is not None  # reused later
    with pytest.raises(BsonFormatError) as strict:
        beam_index.index_files([corrupt], [str(tmp_path / "strict.idx.npz")],
                               errors="strict", beam_options=options, range_bytes=3000)
    with pytest.raises(BsonFormatError) as one_pass:
        index_lib.build(corrupt)
    assert strict.value.offset == one_pass.value.offset
