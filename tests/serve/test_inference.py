"""Export, batch prediction and evaluation."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import (doc, garbled_jpeg, huge_jpeg, jpeg_bytes, serve_without_tfcdisc, slots,
                      write)
from tfcdisc.catalogue import bsonfile
from tfcdisc.serve import inference, scoring, export_format
from tfcdisc.learn import input_pipeline, models, product_predictor
from tfcdisc.learn import rundir
from tfcdisc.serve import exporting


def _products(path, n=None):
    return [p for i, p in enumerate(bsonfile.iter_products(str(path))) if n is None or i < n]


def test_savedmodel_runs_without_tfcdisc_and_matches_keras(catalogue, exported, tmp_path):
    folder, _ = catalogue
    run, saved = exported
    products = _products(folder / "test.bson", 9)
    images = [slots(p.images) for p in products]
    # Expected answers from the Keras checkpoint, through the library's own functions.
    import tensorflow as tf
    model = keras.saving.load_model(rundir.checkpoint_path(str(run)), compile=False)
    # The export's own computation: uint8 decoding, padded slots skipped.
    decoded = input_pipeline.decode_products(tf.constant(images), 32)
    mask = tf.constant([[1.0 if b else 0.0 for b in i] for i in images])
    expected = product_predictor.product_scores(
        product_predictor.image_outputs(model, decoded, mask), mask, 5)
    got = serve_without_tfcdisc(saved, images)
    taxonomy = json.loads(got["taxonomy"])
    ids = np.array(taxonomy["category_ids"])
    assert got["category_id"] == ids[expected["top_k_classes"].numpy()[:, 0]].tolist()
    assert got["top_k_category_id"] == ids[expected["top_k_classes"].numpy()].tolist()
    np.testing.assert_allclose(got["top_k_probability"], expected["top_k_probabilities"],
                               rtol=1e-4, atol=1e-6)
    assert np.array(got["top_k_category_id"]).shape == (9, 5)


def test_cli_show_lists_the_signature(exported):
    out = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli",
                          "show", "--dir", str(exported[1]), "--all"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("serving_default", "inputs['images']", "outputs['category_id']",
                 "outputs['top_k_probability']", "DT_STRING"):
        assert name in out.stdout


def test_submission_has_every_product_in_order(catalogue, exported, tmp_path):
    folder, _ = catalogue
    out = tmp_path / "submission.csv"
    stats = inference.predict(str(exported[1]), str(out), bson=str(folder / "test.bson"),
                            batch_size=16, top_k_output=str(tmp_path / "top.parquet"),
                            progress=False)
    sub = pd.read_csv(out)
    sample = pd.read_csv(folder / "sample_submission.csv")
    assert list(sub.columns) == ["_id", "category_id"]
    assert sub["_id"].tolist() == sample["_id"].tolist() and stats.products == len(sample)
    top = pd.read_parquet(tmp_path / "top.parquet")
    assert top["_id"].tolist() == sub["_id"].tolist()
    assert (top["category_id_1"] == sub["category_id"]).all()


def test_every_product_gets_a_row_whatever_its_images(exported, tmp_path):
    run, saved = exported
    good = jpeg_bytes(seed=1)
    pics = lambda *b: [{"picture": x} for x in b]  # noqa: E731
    products = [doc(11, cid=None, imgs=pics(good, jpeg_bytes(seed=2), jpeg_bytes(seed=3),
                                            jpeg_bytes(seed=4))),
                doc(12, cid=None, imgs=pics(jpeg_bytes("L"))),
                doc(13, cid=None, imgs=pics(b"\xff\xd8corrupt", good)),
                doc(14, cid=None, imgs=pics(b"garbage bytes", b"<html>")),
                doc(15, cid=None, imgs=pics(jpeg_bytes("CMYK"))),
                doc(16, cid=None, imgs=pics(garbled_jpeg(), good)),  # scan data garbage
                doc(17, cid=None, imgs=pics(huge_jpeg()))]  # claims 60000x60000
    path = write(tmp_path, *products, name="test.bson")
    out = tmp_path / "submission.csv"
    stats = inference.predict(str(saved), str(out), bson=path, progress=False)
    sub = pd.read_csv(out)
    assert sub["_id"].tolist() == [11, 12, 13, 14, 15, 16, 17]
    export = export_format.load(str(saved))
    fallback = export.category_ids[export.fallback_class]
    assert sub["category_id"].iloc[3] == fallback and sub["category_id"].iloc[6] == fallback
    assert set(sub["category_id"]) <= set(export.category_ids.tolist())
    assert stats.corrupt_images == 5 and stats.products_without_images == 2
    skipped = {(pid, k): why for pid, k, why in stats.skipped_images}
    assert sorted(skipped) == [(13, 0), (14, 0), (14, 1), (16, 0), (17, 0)]
    assert "not a JPEG" in skipped[14, 0] and "cannot be decoded" in skipped[16, 0]
    assert "60000x60000" in skipped[17, 0] and export.max_image_pixels == 180 * 180


def test_interrupted_prediction_leaves_no_partial_submission(catalogue, exported, tmp_path,
                                                           monkeypatch):
    folder, _ = catalogue
    real = inference.run_predictions

    def crash_after_first(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(inference, "run_predictions", crash_after_first)
    out = tmp_path / "submission.csv"
    with pytest.raises(KeyboardInterrupt):
        inference.predict(str(exported[1]), str(out), bson=str(folder / "test.bson"),
                        batch_size=8, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_prediction_leaves_nothing_beside_the_output(catalogue, exported, tmp_path):
    """SIGKILL cannot be caught: the rows go to a temporary file elsewhere, so the output
    folder holds only the finished submission or nothing (it held submission.csv.tmp)."""
    folder, _ = catalogue
    script = textwrap.dedent("""
        import os, signal, sys
        from tfcdisc.serve import inference
        real = inference.run_predictions
        def die_after_first(*args, **kwargs):
            gen = real(*args, **kwargs)
            yield next(gen)
            os.kill(os.getpid(), signal.SIGKILL)
        inference.run_predictions = die_after_first
        inference.predict(sys.argv[1], sys.argv[2], bson=sys.argv[3], batch_size=8,
                          progress=False)
    """)
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(exported[1]), str(out),
                           str(folder / "test.bson")], capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert list(out.parent.iterdir()) == []


def test_evaluate_equals_the_scored_submission(catalogue, exported, tmp_path):
    folder, _ = catalogue
    out = tmp_path / "submission.csv"
    inference.predict(str(exported[1]), str(out), bson=str(folder / "test.bson"), progress=False)
    labels = pd.read_csv(folder / "test_labels.csv")
    scored = (pd.read_csv(out)["category_id"] == labels["category_id"]).mean()
    report = scoring.evaluate(str(exported[1]), bson=str(folder / "test.bson"),
                               labels=str(folder / "test_labels.csv"), progress=False,
                               thumbnails=True)
    assert report["product_accuracy"] == pytest.approx(scored)
    # Each plotted pair has a picture of its mistake (a JPEG of the test file) and, where
    # the set has one, of the category it was taken for.
    pairs = report["most_confused"][:scoring.PLOTTED_PAIRS]
    assert pairs and list(report["_thumbnails"]) == [(p["true"], p["predicted"]) for p in pairs]
    assert all(m[:2] == b"\xff\xd8" and (e is None or e[:2] == b"\xff\xd8")
               for m, e in report["_thumbnails"].values())
    assert report["products"] == len(labels)
    assert 1.0 >= report["top5_accuracy"] >= report["product_accuracy"] > 0.0
    assert 1.0 >= report["level1_accuracy"] >= report["level2_accuracy"] >= \
        report["product_accuracy"]
    assert 0.0 < report["image_accuracy"] <= 1.0
    assert sum(v["products"] for v in report["accuracy_by_num_images"].values()) == len(labels)
    assert all(len(w["names"]) == 3 for w in report["worst_categories"])
    by_level1 = report["accuracy_by_level1"]  # what the plot's first panel draws
    assert sum(v["products"] for v in by_level1.values()) == len(labels)
    hits = sum(v["product_accuracy"] * v["products"] for v in by_level1.values())
    assert hits / len(labels) == pytest.approx(report["product_accuracy"])
    scoring.plot(report, str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    again = json.loads(scoring.to_json(report))
    assert (again["product_accuracy"], again["products"]) == (report["product_accuracy"],
                                                             report["products"])


def test_evaluate_on_a_labelled_bson_and_a_tfds_split(catalogue, dataset, exported):
    folder, _ = catalogue
    on_train = scoring.evaluate(str(exported[1]), bson=str(folder / "train.bson"),
                                 progress=False)
    assert on_train["products"] == 240
    on_val = scoring.evaluate(str(exported[1]), data_dir=dataset.data_dir,
                               split="validation", progress=False)
    assert on_val["products"] == dataset.info.splits["validation"].num_examples
    with pytest.raises(ValueError, match="give --labels"):
        scoring.evaluate(str(exported[1]), bson=str(folder / "test.bson"), progress=False)


def test_predict_from_a_tfds_split_and_argument_errors(dataset, exported, tmp_path):
    out = tmp_path / "s.csv"
    stats = inference.predict(str(exported[1]), str(out), data_dir=dataset.data_dir,
                            split="test", progress=False)
    assert stats.products == dataset.info.splits["test"].num_examples
    assert len(pd.read_csv(out)) == stats.products
    with pytest.raises(ValueError, match="exactly one of --bson and --data_dir"):
        inference.predict(str(exported[1]), str(out), progress=False)
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        rundir.checkpoint_path(str(tmp_path))


def test_the_strategy_path_agrees_with_the_savedmodel(catalogue, exported, tmp_path):
    """predict runs the export's Keras model under a strategy; the self-contained
    SavedModel (serving, TF Serving) must give the same answers on the same products."""
    import tensorflow as tf
    folder, _ = catalogue
    out = tmp_path / "submission.csv"
    inference.predict(str(exported[1]), str(out), bson=str(folder / "test.bson"),
                      top_k_output=str(tmp_path / "top.csv"), progress=False)
    products = _products(folder / "test.bson")
    images = tf.constant([slots(p.images) for p in products])
    served = tf.saved_model.load(str(exported[1])).signatures["serving_default"](images=images)
    sub, top = pd.read_csv(out), pd.read_csv(tmp_path / "top.csv")
    assert sub["category_id"].tolist() == served["category_id"].numpy().tolist()
    np.testing.assert_allclose(top["probability_1"], served["probability"].numpy(),
                               rtol=1e-4, atol=1e-6)


def test_mirrored_prediction_writes_the_same_submission(catalogue, exported, tmp_path):
    folder, _ = catalogue
    script = textwrap.dedent("""
        import sys
        import tensorflow as tf
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
        from tfcdisc.serve import inference, scoring
        stats = inference.predict(sys.argv[1], sys.argv[2], bson=sys.argv[3], batch_size=6,
                                  strategy="mirrored", progress=False)
        report = scoring.evaluate(sys.argv[1], bson=sys.argv[3], labels=sys.argv[4],
                                  strategy="mirrored", progress=False)
        print(report["product_accuracy"], report["products"], stats.replicas, stats.strategy)
    """)
    mirrored = tmp_path / "mirrored.csv"
    done = subprocess.run([sys.executable, "-c", script, str(exported[1]), str(mirrored),
                           str(folder / "test.bson"), str(folder / "test_labels.csv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy, products, replicas, name = done.stdout.split()[-4:]
    assert (replicas, name) == ("2", "MirroredStrategy")
    report = scoring.evaluate(str(exported[1]), bson=str(folder / "test.bson"),
                              labels=str(folder / "test_labels.csv"), progress=False)
    assert float(accuracy) == report["product_accuracy"] and int(products) == report["products"]
    default = tmp_path / "default.csv"
    inference.predict(str(exported[1]), str(default), bson=str(folder / "test.bson"),
                      batch_size=7, progress=False)
    assert mirrored.read_text() == default.read_text()


def test_validation_in_training_equals_evaluate_on_the_same_checkpoint(dataset, exported):
    run, saved = exported
    history = pd.read_csv(run / "history.csv")
    best = history["val_product_accuracy"].max()  # export takes the best checkpoint
    report = scoring.evaluate(str(saved), data_dir=dataset.data_dir, split="validation",
                              progress=False)
    assert report["product_accuracy"] == pytest.approx(best, abs=1e-9)


def test_an_efficientnet_trained_from_imagenet_weights_exports_what_it_computes(
        exported, tmp_path, monkeypatch):
    """Keras adds a rescaling layer to EfficientNet B0-B7 only when built with
    weights="imagenet"; a rebuild from flags (weights=None) lacked it, so such exports
    computed other features. The "ImageNet" weights here are made offline."""
    import shutil
    import h5py
    import tensorflow as tf
    from keras.src.applications import efficientnet
    from keras.src.legacy.saving import legacy_h5_format
    run, _ = exported
    fake = tmp_path / "imagenet_b0_notop.h5"
    base = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                             input_shape=(32, 32, 3), pooling="avg")
    with h5py.File(fake, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, base)
    monkeypatch.setattr(efficientnet.file_utils, "get_file", lambda *a, **k: str(fake))
    config = json.load(open(run / "config.json"))
    config["train"].update(backbone="efficientnet_b0", weights="imagenet")
    info = config["dataset"]
    model = models.build_image_model("efficientnet_b0", info["num_classes"], image_size=32,
                                     weights="imagenet", num_level1=0, num_level2=0)
    def rescalings(m):
        return sum(type(layer).__name__ == "Rescaling"
                   for layer in m.get_layer("efficientnetb0").layers)

    assert rescalings(model) == 2
    kernel, bias = model.get_layer("label").get_weights()  # logits that follow the features
    model.get_layer("label").set_weights(
        [np.random.default_rng(0).normal(size=kernel.shape).astype("float32") * 50, bias])
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.json").write_text(json.dumps(config))
    model.save(copy / "checkpoints" / "best.keras")
    out = tmp_path / "export"
    exporting.export(str(copy), str(out))
    images = [[jpeg_bytes(seed=i), jpeg_bytes(seed=i + 10), b"", b""] for i in range(3)]
    decoded = input_pipeline.decode_products(tf.constant(images), 32)
    mask = tf.constant([[1.0, 1.0, 0.0, 0.0]] * 3)
    expected = product_predictor.product_scores(
        product_predictor.image_outputs(model, decoded, mask), mask, 5)
    got = tf.saved_model.load(str(out)).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got["top_k_probability"].numpy(),
                               expected["top_k_probabilities"].numpy(), rtol=1e-4, atol=1e-6)
    exported_model = export_format.load(str(out)).image_model  # what predict and evaluate run
    assert rescalings(exported_model) == 2
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(exported_model(pixels)["label"], model(pixels)["label"],
                               rtol=1e-4, atol=1e-4)


def test_flip_tta_averages_the_mirrored_view_in_log_probability_space(exported, tmp_path):
    import tensorflow as tf
    run, _ = exported
    out = tmp_path / "tta"
    summary = exporting.export(str(run), str(out), tta="flip")
    assert summary["tta"] == "flip" and export_format.read_metadata(str(out))["tta"] == "flip"
    plain = rundir.float32_model(rundir.checkpoint_path(str(run)))
    pixels = np.random.default_rng(2).integers(0, 256, (3, 48, 48, 3)).astype("uint8")
    by_hand = (tf.nn.log_softmax(plain(pixels)["label"]) +
               tf.nn.log_softmax(plain(pixels[:, :, ::-1])["label"])) / 2
    tta = export_format.load(str(out)).image_model
    np.testing.assert_allclose(tta(pixels)["label"], by_hand, rtol=1e-5, atol=1e-5)
    assert not np.allclose(by_hand, tf.nn.log_softmax(plain(pixels)["label"]), atol=1e-3)
    images = [[jpeg_bytes(seed=i), b"", b"", b""] for i in range(3)]
    decoded = input_pipeline.decode_products(tf.constant(images), 32)
    mask = tf.constant([[1.0, 0.0, 0.0, 0.0]] * 3)
    expected = product_predictor.product_scores(
        product_predictor.image_outputs(tta, decoded, mask), mask, 5)
    got = tf.saved_model.load(str(out)).signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(got["top_k_probability"], expected["top_k_probabilities"],
                               rtol=1e-4, atol=1e-6)


def test_an_ensemble_averages_its_members_probabilities(dataset, exported, catalogue,
                                                        tmp_path):
    """Members of other backbones' sizes and TTA; checked by hand, in a process that cannot
    import tfcdisc, and through predict."""
    import tensorflow as tf
    from tfcdisc.learn import training
    run_b = tmp_path / "run_b"
    training.train(training.TrainConfig(
        data_dir=dataset.data_dir, model_dir=str(run_b), backbone="small_cnn", image_size=40,
        global_batch_size=32, epochs=1, steps_per_epoch=4, optimizer="adamw",
        learning_rate=0.004, bn_momentum=0.9, strategy="default", mixed_precision="float32",
        shuffle_buffer=256, eval_batch_size=16, seed=1, verbose=0))
    exporting.export(str(run_b), str(tmp_path / "b"), tta="flip")
    members = [str(exported[1]), str(tmp_path / "b")]
    out = tmp_path / "ensemble"
    summary = exporting.ensemble(members, str(out), weights=[1, 3])
    assert summary["image_size"] == 40 and [m["weight"] for m in summary["members"]] == [1, 3]
    a, b = (export_format.load(m).image_model for m in members)
    images = [[jpeg_bytes(seed=i), jpeg_bytes(seed=i + 5), b"", b""] for i in range(4)]
    decoded = input_pipeline.decode_products(tf.constant(images), 40)
    flat = tf.reshape(decoded, [-1, 40, 40, 3])
    probs = (1 * tf.nn.softmax(a(flat)["label"]) + 3 * tf.nn.softmax(b(flat)["label"])) / 4
    log_p = tf.reshape(tf.math.log(probs), [4, 4, -1])
    mask = np.array([[1.0, 1.0, 0.0, 0.0]] * 4, np.float32)
    combined = tf.reduce_sum(log_p * mask[..., None], axis=1) / 2  # masked mean, 2 images
    expected = tf.nn.softmax(combined).numpy()
    got = serve_without_tfcdisc(out, images)  # the ensemble must not need tfcdisc
    ids = export_format.load(str(out)).category_ids
    top = np.argsort(-expected, axis=1)[:, :5]
    assert got["top_k_category_id"] == ids[top].tolist()
    np.testing.assert_allclose(got["top_k_probability"], np.take_along_axis(expected, top, 1),
                               rtol=1e-3, atol=1e-5)
    sub = tmp_path / "submission.csv"
    stats = inference.predict(str(out), str(sub), bson=str(catalogue[0] / "test.bson"),
                              progress=False)
    assert len(pd.read_csv(sub)) == stats.products == 60


def test_predict_on_beam_writes_the_local_submission(catalogue, exported, tmp_path):
    """RunInference over byte ranges (DirectRunner, the launcher's way to Dataflow) writes
    the local path's submission: header, one row per product, file order, same
    categories; bad images are counted as locally."""
    from tfcdisc.serve import beam_predict
    folder, _ = catalogue
    good = jpeg_bytes(seed=1)
    pics = lambda *b: [{"picture": x} for x in b]  # noqa: E731
    odd = write(tmp_path, doc(11, cid=None, imgs=pics(good)),
                doc(12, cid=None, imgs=pics(b"garbage bytes", good)),
                doc(13, cid=None, imgs=pics(garbled_jpeg())), name="odd.bson")
    options = beam_predict.pipeline_options("runner=DirectRunner")
    for bson_path in (str(folder / "test.bson"), odd):
        local, beam = tmp_path / "local.csv", tmp_path / "beam.csv"
        expected = inference.predict(str(exported[1]), str(local), bson=bson_path,
                                     progress=False)
        got = beam_predict.predict(str(exported[1]), str(beam), bson=bson_path,
                                   beam_options=options, batch_size=16, range_bytes=20_000)
        assert beam.read_text() == local.read_text()
        assert (got.products, got.images, got.corrupt_images, got.products_without_images,
                got.skipped_images) == (expected.products, expected.images,
                                        expected.corrupt_images,
                                        expected.products_without_images,
                                        expected.skipped_images)
        assert not (tmp_path / "beam.csv.parts").exists()
    assert got.corrupt_images == 2 and got.products_without_images == 1
