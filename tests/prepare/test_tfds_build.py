"""The TFDS builder on synthetic catalogues: bytes untouched, labels, splits, bad input."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from conftest import garbled_jpeg, build_dataset, doc, jpeg_bytes, read_split, write, write_taxonomy
from tfcdisc.prepare import plan as build_plan, records
from tfcdisc.catalogue import bsonfile
from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc.catalogue.bsonfile import BsonFormatError
from tfcdisc.prepare import metadata


@pytest.fixture(scope="module")
def built(catalogue, dataset):
    folder, _ = catalogue
    return folder, dataset, {s: read_split(dataset, s) for s in ("train", "validation", "test")}


def test_examples_are_the_bson_products_untouched(built):
    folder, builder, splits = built
    tax = taxonomy_lib.load(str(folder / "category_names.csv"))
    names = builder.info.features["label"].names
    l1_names = builder.info.features["label_level1"].names
    for name, split_names in (("train.bson", ("train", "validation")), ("test.bson", ("test",))):
        products = {p.product_id: p for p in bsonfile.iter_products(str(folder / name))}
        got = {pid: ex for s in split_names for pid, ex in splits[s].items()}
        assert set(got) == set(products)  # the splits add up, nothing lost or repeated
        assert sum(len(splits[s]) for s in split_names) == len(products)
        for pid, ex in got.items():
            p = products[pid]
            assert ex["images"] == p.images and ex["num_images"] == len(p.images)
            if name == "test.bson":
                assert ex["label"] == ex["label_level1"] == ex["label_level2"] == -1
                continue
            assert int(names[ex["label"]]) == p.category_id
            c = int(tax.class_index(p.category_id))
            assert ex["label"] == c and ex["label_level2"] == tax.class_to_level2[c]
            assert l1_names[ex["label_level1"]] == tax.names(c)[0]


def test_validation_is_stratified_and_not_a_slice(built):
    folder, builder, splits = built
    train = {p.product_id: p.category_id for p in bsonfile.iter_products(
        str(folder / "train.bson"))}
    val_ids = sorted(splits["validation"])
    assert len(val_ids) == 12  # at least one per category (12), 2% of 240 is less
    assert {train[i] for i in val_ids} == set(train.values())
    order = sorted(train)
    positions = [order.index(i) for i in val_ids]
    assert max(positions) - min(positions) > len(order) // 2  # spread, not a slice
    # A shard interleaves runs spread over the file: whatever order a catalogue file has,
    # its first products come from all over the file, not from one stretch of it (TFDS
    # reads 16 from each shard in turn: 64 is two rounds of the two shards).
    ds = builder.as_dataset(split="train", shuffle_files=False)
    first = [int(ex["product_id"]) for ex in ds.take(64).as_numpy_iterator()]
    spread = [order.index(i) for i in first]
    assert max(spread) - min(spread) >= len(order) // 2


def test_metadata_carries_taxonomy_and_counts(built):
    folder, builder, _ = built
    reread = __import__("tensorflow_datasets").builder_from_directory(builder.data_dir)
    facts = metadata.read(reread)
    tax = facts.taxonomy
    assert tax.to_dict() == taxonomy_lib.load(str(folder / "category_names.csv")).to_dict()
    stats = facts.build_stats
    assert stats["dropped_images"] == {} and stats["dropped_products"] == 0
    assert stats["splits"]["test"]["products"] == 60 == facts.products["test"]
    assert facts.images["train"] == stats["splits"]["train"]["images"] > 0
    assert facts.class_counts.sum() == stats["splits"]["train"]["products"]
    assert facts.fallback_class == int(np.argmax(facts.class_counts))
    assert reread.info.features["label"].names == [str(c) for c in tax.category_ids]
    info = facts.model_info()
    assert (info["num_level1"], info["num_level2"]) == (
        reread.info.features["label_level1"].num_classes,
        reread.info.features["label_level2"].num_classes)


def test_metadata_without_a_taxonomy_names_the_data_dir_and_the_rebuild():
    class Old:  # a build by a version that recorded no taxonomy
        data_dir = "/data/cdiscount/default/0.9.0"
        info = type("Info", (), {"metadata": {"class_counts": [1, 2]}, "splits": {}})()
    with pytest.raises(ValueError, match=r"^/data/cdiscount/default/0.9.0: the dataset's "
                       r"metadata has no 'taxonomy'.*rebuild it \(python -m tfcdisc.build"):
        metadata.read(Old())


def test_validation_quota():
    q = build_plan.validation_quota(np.array([1, 2, 3, 100, 1000]), 30)
    assert q.sum() == 30 and q[0] == 0 and (q[1:] >= 1).all() and q[4] > q[3] > q[2]
    assert (q <= np.array([0, 1, 2, 99, 999])).all()
    assert build_plan.validation_quota(np.array([5, 5, 5]), 2).sum() == 2


def _small_catalogue(tmp_path, train_docs, test_docs, categories=(1000000100, 1000000200)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write(tmp_path, *train_docs, name="train.bson")
    write(tmp_path, *test_docs, name="test.bson")
    write_taxonomy(tmp_path, categories)
    return tmp_path


def test_legal_bson_variations_build(tmp_path, monkeypatch):
    import bson
    from bson.int64 import Int64
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", "1")
    good = jpeg_bytes()
    imgs = [{"picture": good}]
    train = [bson.encode({"_id": Int64(2**40 + i), "imgs": imgs, "category_id": Int64(c),
                          "title": "Chaise", "price": 9.5})
             for i, c in enumerate([1000000100] * 3 + [1000000200] * 3)]
    test = [bson.encode({"_id": 7, "imgs": [{"picture": good, "w": 180}], "extra": [1, 2]})]
    folder = _small_catalogue(tmp_path / "kaggle", train, test)
    builder = build_dataset(folder, tmp_path / "data")
    got = read_split(builder, "train") | read_split(builder, "validation")
    assert sorted(got) == [2**40 + i for i in range(6)]
    assert read_split(builder, "test")[7]["images"] == [good]


@pytest.mark.parametrize("decode_images", [False, True])
def test_bad_images_are_dropped_and_counted(tmp_path, monkeypatch, decode_images):
    """Headers only (the default): an image with intact headers and garbage scan data is
    kept, for the pipelines' fail-safe decode to mask; ``decode_images`` drops it here."""
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", "1")
    good, gray, cmyk, prog = (jpeg_bytes(), jpeg_bytes("L"), jpeg_bytes("CMYK"),
                              jpeg_bytes(progressive=True))
    garbage = b"<html>not a jpeg</html>"
    truncated = good[: len(good) // 2]
    pics = lambda *b: [{"picture": x} for x in b]  # noqa: E731
    garbled = garbled_jpeg(1), garbled_jpeg(2)
    train = [doc(1, imgs=pics(good, garbage)), doc(2, imgs=pics(garbage)),
             doc(3, imgs=pics(gray)), doc(4, imgs=pics(cmyk, prog)),
             doc(5, cid=1000000200, imgs=pics(good)), doc(6, cid=1000000200, imgs=pics(good)),
             doc(8, cid=1000000200, imgs=pics(truncated, jpeg_bytes(size=(100, 120)))),
             doc(9, cid=1000000200, imgs=pics(garbled[0], good))]
    test = [doc(10, cid=None, imgs=pics(garbage)), doc(11, cid=None, imgs=pics(good, gray)),
            doc(12, cid=None, imgs=pics(garbled[1]))]
    folder = _small_catalogue(tmp_path / "kaggle", train, test)
    config = {"decode_images": True} if decode_images else {}
    builder = build_dataset(folder, tmp_path / "data", **config)
    got = read_split(builder, "train") | read_split(builder, "validation")
    assert sorted(got) == [1, 3, 4, 5, 6, 9]  # 2 and 8 had no good image left
    assert got[1]["images"] == [good] and got[4]["images"] == [cmyk, prog]
    test_split = read_split(builder, "test")
    assert test_split[10]["num_images"] == 0 and test_split[11]["images"] == [good, gray]
    stats = metadata.read(builder).build_stats
    dropped = {"not_jpeg": 3, "truncated": 1, "wrong_size": 1}
    if decode_images:  # headers intact, scan garbage: dropped, counted
        assert got[9]["images"] == [good] and test_split[12]["num_images"] == 0
        assert stats["dropped_images"] == {**dropped, "undecodable": 2}
    else:  # kept as they are, for the pipelines to mask and count
        assert got[9]["images"] == [garbled[0], good]
        assert test_split[12]["images"] == [garbled[1]]
        assert stats["dropped_images"] == dropped
    assert stats["dropped_products"] == 2
    assert stats["products_without_images"] == 1 + decode_images
    assert any("_id 2" in e and "not a JPEG" in e for e in stats["examples"])
    if not decode_images:
        return
    # Grayscale, CMYK and progressive images decode to three channels.
    decoded = builder.as_dataset(split="train").concatenate(
        builder.as_dataset(split="validation"))
    for ex in decoded:
        assert ex["images"].shape[1:] == (180, 180, 3)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fail_policy_names_the_image(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", workers)  # "2": raised in a worker process
    train = [doc(i, imgs=[{"picture": jpeg_bytes()}]) for i in range(3)]
    train.append(doc(9, imgs=[{"picture": b"garbage"}]))
    test = [doc(20, cid=None, imgs=[{"picture": jpeg_bytes()}])]
    folder = _small_catalogue(tmp_path / "kaggle", train, test)
    with pytest.raises(ValueError, match=r"train.bson: byte offset \d+ \(_id 9\) image 0: not a"):
        build_dataset(folder, tmp_path / "data", bad_images="fail")


def test_bson_errors_stop_the_build_with_their_message(tmp_path):
    train = [doc(i, imgs=[{"picture": jpeg_bytes()}]) for i in range(4)]
    folder = _small_catalogue(tmp_path / "kaggle", train[:3] + [train[3][:-9]], [doc(20, cid=None)])
    with pytest.raises(BsonFormatError, match="train.bson: byte offset .* runs past the end"):
        build_dataset(folder, tmp_path / "data")


def test_unknown_category_and_missing_files_are_named(tmp_path):
    train = [doc(1, cid=1000000999)]
    folder = _small_catalogue(tmp_path / "kaggle", train, [doc(2, cid=None)])
    with pytest.raises(ValueError, match="_id 1.*category_id 1000000999 is not in"):
        build_dataset(folder, tmp_path / "data")
    (folder / "test.bson").unlink()
    with pytest.raises(FileNotFoundError, match="missing test.bson"):
        build_dataset(folder, tmp_path / "data2")


def test_parallel_and_sequential_builds_write_the_same_shards(catalogue, tmp_path, monkeypatch):
    folder, _ = catalogue
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", "1")
    one = build_dataset(folder, tmp_path / "one")
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", "2")
    two = build_dataset(folder, tmp_path / "two")
    names = sorted(p.name for p in pathlib.Path(one.data_dir).glob("cdiscount-*"))
    assert len(names) == 6
    for name in names:
        # Same examples in the same order; compared parsed, because protobuf map order
        # in a serialized tf.train.Example may differ between processes.
        a, b = (_records(pathlib.Path(b.data_dir) / name) for b in (one, two))
        assert a == b, name
    assert json.dumps(metadata.read(one).build_stats, sort_keys=True) == json.dumps(
        metadata.read(two).build_stats, sort_keys=True)


def _records(path):
    return [tf.train.Example.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(str(path))]


def test_fast_serializer_matches_tfds(catalogue):
    from tensorflow_datasets.core import example_serializer
    folder, _ = catalogue
    feature_dict = records.features(taxonomy_lib.load(str(folder / "category_names.csv")))
    tfds_serializer = example_serializer.ExampleSerializer(feature_dict.get_serialized_info())
    for ex in ({"product_id": 2**40, "images": [jpeg_bytes(), jpeg_bytes("L")], "num_images": 2,
                "label": 3, "label_level1": 1, "label_level2": 2},
               {"product_id": 5, "images": [], "num_images": 0, "label": -1,
                "label_level1": -1, "label_level2": -1}):
        theirs = tfds_serializer.serialize_example(feature_dict.encode_example(ex))
        assert tf.train.Example.FromString(records.serialize(ex)) == \
            tf.train.Example.FromString(theirs)


def test_tfds_load_by_name_after_importing_the_builder(dataset):
    import tensorflow_datasets as tfds
    import tfds_builder.cdiscount.cdiscount_dataset_builder  # noqa: F401  (registers it)
    data_dir = str(pathlib.Path(dataset.data_dir).parents[2])
    ds = tfds.load("cdiscount", split="validation", data_dir=data_dir)
    assert sum(1 for _ in ds) == dataset.info.splits["validation"].num_examples


def test_one_build_per_config_folder_and_a_killed_builds_remains_go(tmp_path):
    """Two builds into one data dir mixed their splits; a SIGKILLed build's incomplete.*
    folder (a dataset-sized copy on the real data) was never removed."""
    import json
    import socket
    import subprocess
    import sys
    from tfcdisc.catalogue import folder_lock, synth
    synth.generate(str(tmp_path / "k"), 60, 10, num_categories=4, seed=5, workers=1)
    config_dir = tmp_path / "data" / "cdiscount" / "default"
    config_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)
    try:
        (config_dir / ".tfcdisc-build.lock").write_text(json.dumps(
            {"what": "tfds build", "host": socket.gethostname(), "pid": holder.pid,
             "since": "now"}))
        with pytest.raises(folder_lock.FolderBusyError, match="is being written by tfds build"):
            build_dataset(tmp_path / "k", tmp_path / "data")
    finally:
        holder.communicate(b"")
    stale = config_dir / "incomplete.0123456789abcdef0123456789abcdef_1.0.0"
    (stale / "junk").mkdir(parents=True)
    builder = build_dataset(tmp_path / "k", tmp_path / "data")  # the dead holder's lock too
    assert builder.info.splits["train"].num_examples > 0
    assert sorted(p.name for p in config_dir.iterdir()) == ["1.0.0"]
