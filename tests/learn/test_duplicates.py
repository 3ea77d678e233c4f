"""The duplicate-image lookup: its table, its blend, and an export that carries both."""


import numpy as np
import pandas as pd
import tensorflow as tf

from conftest import build_dataset, doc, jpeg_bytes, serve_without_tfcdisc, write_taxonomy
from tfcdisc.learn import duplicates, training
from tfcdisc.serve import inference, scoring
from tfcdisc.serve import exporting
from tfcdisc.prepare import metadata


def test_the_table_keeps_each_image_top_category_and_its_share():
    a, b, c = b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c"
    images = tf.data.Dataset.from_tensor_slices(
        ([a, a, a, b, c, c, a], [1, 1, 2, 0, 3, 3, 1]))
    table = duplicates.build(images)
    assert len(table) == 3 and table.images == 7
    by_key = dict(zip(table.keys.tolist(), zip(table.top_class.tolist(), table.share.tolist())))
    keys = duplicates.fingerprints(tf.constant([a, b, c])).numpy().tolist()
    assert by_key[keys[0]] == (1, 0.75) and by_key[keys[1]] == (0, 1.0)
    assert by_key[keys[2]] == (3, 1.0)
    seen = dict(zip(table.keys.tolist(), table.seen.tolist()))  # sightings, all categories
    assert [seen[k] for k in keys] == [4, 1, 2]
    restored = duplicates.Table.from_bytes(table.to_bytes())
    assert restored.keys.tolist() == table.keys.tolist() and restored.images == 7
    assert restored.seen.tolist() == table.seen.tolist()


def test_the_blend_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    log_probs = tf.nn.log_softmax(logits).numpy()
    cls = np.array([[2, -1, 0, -1], [-1, -1, -1, 4]], np.int32)
    share = np.array([[0.75, 0, 1.0, 0], [0, 0, 0, 0.5]], np.float32)
    got = duplicates.blend(tf.constant(log_probs), tf.constant(cls), tf.constant(share),
                           0.3).numpy()
    for i in range(2):
        for j in range(4):
            if cls[i, j] < 0:
                np.testing.assert_allclose(got[i, j], log_probs[i, j], rtol=1e-6)
                continue
            q = np.full(5, (1 - share[i, j]) / 4)
            q[cls[i, j]] = share[i, j]
            expected = np.log(0.7 * np.exp(log_probs[i, j]) + 0.3 * q)
            np.testing.assert_allclose(got[i, j], expected, rtol=1e-5, atol=1e-6)


def _recurring_catalogue(folder):
    """Products draw their images from a small pool per category, so train, validation
    and test share exact bytes, as the real catalogue does."""
    folder.mkdir(parents=True)
    categories = [1000000100, 1000000200, 1000000300, 1000000400]
    pools = {c: [jpeg_bytes(seed=10 * k + i) for i in range(3)]
             for k, c in enumerate(categories)}
    rng = np.random.default_rng(0)
    train, test, labels = [], [], []
    for pid in range(1, 161):
        c = categories[pid % 4]
        picks = rng.choice(3, size=1 + pid % 2, replace=False)
        train.append(doc(pid, cid=c, imgs=[{"picture": pools[c][i]} for i in picks]))
    for pid in range(1001, 1021):
        c = categories[pid % 4]
        test.append(doc(pid, cid=None, imgs=[{"picture": pools[c][pid % 3]}]))
        labels.append((pid, c))
    (folder / "train.bson").write_bytes(b"".join(train))
    (folder / "test.bson").write_bytes(b"".join(test))
    write_taxonomy(folder, categories)
    pd.DataFrame(labels, columns=["_id", "category_id"]).to_csv(folder / "labels.csv",
                                                                index=False)
    return folder


def test_an_export_with_duplicates_blends_where_images_recur(tmp_path):
    folder = _recurring_catalogue(tmp_path / "k")
    builder = build_dataset(folder, tmp_path / "data")
    run = tmp_path / "run"
    training.train(training.TrainConfig(  # two steps: a model that knows next to nothing
        data_dir=builder.data_dir, model_dir=str(run), backbone="small_cnn", image_size=32,
        global_batch_size=16, epochs=1, steps_per_epoch=2, optimizer="adamw",
        learning_rate=0.0001, strategy="default", mixed_precision="float32",
        shuffle_buffer=64, eval_batch_size=8, seed=0, verbose=0))
    plain, with_table = tmp_path / "plain", tmp_path / "dup"
    exporting.export(str(run), str(plain))
    summary = exporting.export(str(run), str(with_table), duplicates_from=builder.data_dir)
    info = summary["duplicates"]
    assert info["unique_images"] == 12 and info["weight"] > 0  # chosen: it helped
    # The submission's table knows the validation split's images too (its weight was
    # chosen with the train split's table, on validation).
    stats = metadata.read(builder).build_stats["splits"]
    assert info["labelled_images"] == stats["train"]["images"] + stats["validation"]["images"]
    accuracy = info["validation_accuracy_by_weight"]
    assert accuracy[str(info["weight"])] > accuracy["0.0"]
    labels = str(folder / "labels.csv")
    test = str(folder / "test.bson")
    base = scoring.evaluate(str(plain), bson=test, labels=labels, progress=False)
    report = scoring.evaluate(str(with_table), bson=test, labels=labels, progress=False)
    assert report["duplicates"]["products_touched"] == 20
    assert report["product_accuracy"] == 1.0 > base["product_accuracy"]
    out = tmp_path / "submission.csv"
    inference.predict(str(with_table), str(out), bson=test, progress=False)
    predicted = pd.read_csv(out)
    # The SavedModel looks the bytes up itself, in a process that cannot import tfcdisc.
    from tfcdisc.catalogue import bsonfile
    products = list(bsonfile.iter_products(test))
    got = serve_without_tfcdisc(with_table, [[p.images[0], b"", b"", b""] for p in products])
    assert got["category_id"] == predicted["category_id"].tolist()
