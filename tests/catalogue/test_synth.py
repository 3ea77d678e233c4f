"""The synthetic catalogue: real format, learnable hierarchy, long tail, determinism."""

import io
import os

import bson
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REAL_CATEGORY_NAMES
from tfcdisc.catalogue import bsonfile, synth
from tfcdisc.catalogue import taxonomy as taxonomy_lib


def _docs(path):
    with open(path, "rb") as f:
        return list(bson.decode_file_iter(f))


def test_kaggle_layout_and_format(catalogue):
    folder, summary = catalogue
    written = sorted(f for f in os.listdir(folder) if not f.endswith(".idx.npz"))  # indexes
    assert written == ["category_names.csv", "sample_submission.csv",  # come from other tests
                       "test.bson", "test_labels.csv", "train.bson"]
    train, test = _docs(folder / "train.bson"), _docs(folder / "test.bson")
    assert len(train) == 240 and len(test) == 60
    assert all(list(d) == ["_id", "imgs", "category_id"] for d in train)
    assert all(list(d) == ["_id", "imgs"] for d in test)
    # int32 ids, as in the real files: element type 0x10 right after the length prefix.
    raw = (folder / "train.bson").read_bytes()
    assert raw[4:9] == b"\x10_id\x00" and b"\x10category_id\x00" in raw[:20000]
    tax = taxonomy_lib.load(str(folder / "category_names.csv"))
    assert set(d["category_id"] for d in train) == set(tax.category_ids.tolist())
    images = [i["picture"] for d in train + test for i in d["imgs"]]
    assert summary["images"] == len(images)
    for jpeg in images[:40]:
        im = Image.open(io.BytesIO(jpeg))
        assert im.format == "JPEG" and im.size == (180, 180) and im.mode == "RGB"
    mean = np.mean([len(j) for j in images])
    assert 3000 < mean < 7000  # the real catalogue averages about 4.7 KB


def test_ids_labels_and_submission_files(catalogue):
    folder, _ = catalogue
    train, test = _docs(folder / "train.bson"), _docs(folder / "test.bson")
    train_ids = [d["_id"] for d in train]
    test_ids = [d["_id"] for d in test]
    assert train_ids == sorted(set(train_ids)) and test_ids == sorted(set(test_ids))
    assert not set(train_ids) & set(test_ids)
    assert np.diff(sorted(train_ids + test_ids)).max() > 1  # gaps
    sample = pd.read_csv(folder / "sample_submission.csv")
    labels = pd.read_csv(folder / "test_labels.csv")
    assert list(sample.columns) == ["_id", "category_id"] == list(labels.columns)
    assert sample["_id"].tolist() == test_ids == labels["_id"].tolist()
    assert set(labels["category_id"]) <= set(d["category_id"] for d in train)


def test_no_category_order_long_tail_and_image_counts(tmp_path):
    plan, test_plan = synth.plan_catalogue(30, 6000, 1500, np.random.default_rng(0))
    sizes = np.bincount(plan.classes, minlength=30) / 6000
    changes = np.count_nonzero(np.diff(plan.classes)) / 5999
    # In no category order, like the real train.bson (its first five products are in four
    # categories): neighbours differ as often as two random products do.
    assert abs(changes - (1 - (sizes ** 2).sum())) < 0.03
    sizes = np.bincount(plan.classes, minlength=30)
    assert sizes.min() >= synth.MIN_PRODUCTS_PER_CATEGORY and sizes.max() > 10 * sizes.min()
    assert abs(plan.num_images.mean() - 1.75) < 0.05
    assert set(np.unique(plan.num_images)) == {1, 2, 3, 4}
    assert len(test_plan.product_ids) == 1500
    with pytest.raises(ValueError, match="too few"):
        synth.plan_catalogue(30, 50, 10, np.random.default_rng(0))


def test_deterministic_for_a_seed(tmp_path):
    a = synth.generate(str(tmp_path / "a"), 30, 5, num_categories=5, seed=3, workers=2)
    b = synth.generate(str(tmp_path / "b"), 30, 5, num_categories=5, seed=3, workers=1)
    synth.generate(str(tmp_path / "c"), 30, 5, num_categories=5, seed=4, workers=1)
    for name in ("train.bson", "test.bson", "category_names.csv", "test_labels.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/train.bson").read_bytes() != (tmp_path / "c/train.bson").read_bytes()
    assert a["images"] == b["images"]


def test_views_of_a_product_differ_but_share_the_item():
    tax = taxonomy_lib.from_frame(synth.builtin_taxonomy_frame())
    styles = synth.category_styles(tax)
    views = [np.asarray(Image.open(io.BytesIO(j)), np.float32)
             for j in synth.render_product(styles[0], 4, (0, 0, 1))]
    other = [np.asarray(Image.open(io.BytesIO(j)), np.float32)
             for j in synth.render_product(styles[len(styles) // 2], 1, (0, 0, 2))]
    assert all(np.abs(views[0] - v).mean() > 1 for v in views[1:])
    # Colour statistics of views of one item are closer than across categories.
    stat = lambda im: np.percentile(im.reshape(-1, 3), 10, axis=0)  # noqa: E731
    within = np.abs(stat(views[0]) - stat(views[1])).sum()
    across = np.abs(stat(views[0]) - stat(other[0])).sum()
    assert within < across


def test_hierarchy_decides_the_look():
    tax = taxonomy_lib.from_frame(synth.builtin_taxonomy_frame())
    styles = synth.category_styles(tax)
    for l2 in range(tax.num_level2):
        leaves = np.flatnonzero(tax.class_to_level2 == l2)
        assert len({styles[c].shape for c in leaves}) == 1  # level 2: one shape family
        assert len({(styles[c].texture, styles[c].mark, round(styles[c].hue, 3))
                    for c in leaves}) == len(leaves)  # level 3: distinct details
        l1 = tax.level2_to_level1[l2]
        assert {styles[c].bg_hue for c in leaves} == {
            styles[c].bg_hue for c in np.flatnonzero(tax.class_to_level1 == l1)}
    for l1 in range(tax.num_level1):
        shapes = [styles[np.flatnonzero(tax.class_to_level2 == n)[0]].shape
                  for n in np.flatnonzero(tax.level2_to_level1 == l1)]
        assert len(set(shapes)) == len(shapes)  # siblings at level 2 differ in shape


@pytest.mark.skipif(not REAL_CATEGORY_NAMES.exists(),
                    reason="the real taxonomy lives in ../shared/data beside the repo")
def test_samples_real_categories_across_levels(tmp_path):
    synth.generate(str(tmp_path), 150, 10, num_categories=30,
                   category_names=str(REAL_CATEGORY_NAMES), seed=1, workers=1)
    assert (tmp_path / "category_names.csv").read_bytes() == REAL_CATEGORY_NAMES.read_bytes()
    tax = taxonomy_lib.load(str(REAL_CATEGORY_NAMES))
    with open(tmp_path / "train.bson", "rb") as f:
        used = {d["category_id"] for d in bson.decode_file_iter(f)}
    classes = tax.class_index(sorted(used))
    assert len(used) == 30
    level2 = tax.class_to_level2[classes]
    assert len(set(tax.class_to_level1[classes])) >= 3
    assert np.bincount(level2).max() >= 2  # several leaves share a level-2 parent


def test_cli_writes_a_catalogue(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "tfcdisc.synth", "--output_dir", str(tmp_path),
                          "--num_train_products", "40", "--num_test_products", "8",
                          "--num_categories", "6", "--seed", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"train_products": 40' in out.stdout
    assert len(_docs(tmp_path / "test.bson")) == 8


def test_the_hard_catalogue_has_copies_noise_and_wrong_labels(tmp_path):
    easy = synth.generate(str(tmp_path / "easy"), 400, 100, num_categories=10, seed=1,
                          workers=1)
    hard = synth.generate(str(tmp_path / "hard"), 400, 100, num_categories=10, seed=1,
                          workers=1, difficulty="hard")
    assert easy["duplicates"]["train_images_that_copy_another"] == 0.0
    assert easy["wrong_training_labels"] == 0
    rates = hard["duplicates"]
    assert 0.2 < rates["train_images_that_copy_another"] < 0.5  # the real file: 0.38
    assert rates["train_images_with_a_copy_in_another_category"] > 0.05
    assert rates["test_images_seen_in_train"] > 0.2
    assert 5 <= hard["wrong_training_labels"] <= 40  # 5% of 400
    # Test labels stay true: the wrong labels are only in train.bson.
    labels = pd.read_csv(tmp_path / "hard" / "test_labels.csv")
    assert len(labels) == 100
    with pytest.raises(ValueError, match="difficulty"):
        synth.generate(str(tmp_path / "x"), 40, 5, num_categories=5, difficulty="extreme")


def test_replicate_reuses_images_under_new_ids(catalogue, tmp_path):
    folder, _ = catalogue
    n = synth.replicate(str(folder), str(tmp_path), 3)
    source = list(bsonfile.iter_products(str(folder / "train.bson")))
    copies = list(bsonfile.iter_products(str(tmp_path / "train.bson")))
    assert n == len(copies) == 3 * len(source)
    assert len({p.product_id for p in copies}) == n  # new ids, all distinct
    for k in range(3):
        part = copies[k * len(source):(k + 1) * len(source)]
        assert [(p.images, p.category_id) for p in part] == [
            (p.images, p.category_id) for p in source]
    data = (tmp_path / "train.bson").read_bytes()
    at = copies[-1].offset
    last = bson.decode(data[at:])
    assert list(last) == ["_id", "imgs", "category_id"] and data[at + 4] == 0x10  # int32 _id
