"""The fusion head: learned on held-out products only, exported as the image model's
``slot_score``, so that flip TTA, ensembles and the SavedModel take it as they are."""

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import serve_without_tfcdisc, slots
from tfcdisc.catalogue import atomic, bsonfile
from tfcdisc.learn import fusion, models, rundir
from tfcdisc.serve import export_format, exporting


def _held_out_products(head, dim):
    """(images per product) of the cached products, in cache order."""
    ds = fusion.features_dataset(str(head / "features"), "validation", dim)
    return [int(x["mask"].numpy().sum()) for x, _ in ds]


def test_the_head_learns_on_held_out_products_and_never_scores_below_the_run(
        exported, dataset, tmp_path):
    run, _ = exported
    head = tmp_path / "fusion"
    summary = fusion.train(str(run), str(head), epochs=3, batch_size=4, learning_rate=0.05)
    # Only the validation split is embedded: the products the run did not train on.
    assert sorted(p.name for p in (head / "features").iterdir()) == [
        fusion.CACHE_KEY, "validation.tfrecord"]
    counts = _held_out_products(head, summary["embedding_dim"])
    assert len(counts) == dataset.info.splits["validation"].num_examples
    # Three in four with two images or more teach it; every fourth chooses the epoch.
    assert summary["learned_on"] == sum(1 for i, n in enumerate(counts)
                                        if i % fusion.CHECK_EVERY != 3 and n >= 2) > 0
    assert summary["checked_on"] == len(counts[fusion.CHECK_EVERY - 1::fusion.CHECK_EVERY])
    by_epoch = summary["check_product_accuracy_by_epoch"]
    assert len(by_epoch) == 3
    chosen = summary["chosen_epoch"]
    best = summary["check_product_accuracy"]
    assert best >= summary["check_product_accuracy_of_the_run"]
    assert best == (by_epoch[chosen - 1] if chosen else
                    summary["check_product_accuracy_of_the_run"])
    assert chosen == 0 or best > summary["check_product_accuracy_of_the_run"]
    saved = keras.saving.load_model(head / fusion.FUSION_MODEL, compile=False)
    if chosen == 0:  # kept at the run's own (the mean: every score zero)
        assert not any(np.any(w) for w in saved.get_weights())


def test_a_head_that_learns_nothing_stays_at_the_runs_own(exported, tmp_path):
    """With nothing learned (learning rate 0) the head is kept at its start: a tie goes to
    the run's own answers."""
    run, _ = exported
    summary = fusion.train(str(run), str(tmp_path / "fusion"), epochs=1, learning_rate=0.0)
    assert summary["chosen_epoch"] == 0
    assert summary["check_product_accuracy"] == summary["check_product_accuracy_of_the_run"]


def _random_head(fusion_dir, seed=0):
    """Gives the head of ``fusion_dir`` random weights: an export must use them as they are."""
    path = fusion_dir / fusion.FUSION_MODEL
    head = keras.saving.load_model(path, compile=False)
    rng = np.random.default_rng(seed)
    head.set_weights([rng.normal(size=w.shape).astype("float32") for w in head.get_weights()])
    head.save(path)
    return head


def _by_hand(base, head, pixels, mask):
    """Flip TTA's product answer with the head's scores, from the checkpoint's own model:
    each view's log-probabilities and scores, averaged, then the scores' softmax over the
    real images weighs their log-probabilities."""
    embed = fusion.with_embedding(base)
    flat = pixels.reshape(-1, *pixels.shape[2:])
    log_probs, scores = [], []
    for view in (flat, flat[:, :, ::-1]):
        out = embed(view)
        log_probs.append(tf.nn.log_softmax(out["label"]).numpy())
        scores.append(head([out["embedding"], out["label"]]).numpy()[:, 0])
    log_probs = np.mean(log_probs, axis=0).reshape(*pixels.shape[:2], -1)
    scores = np.mean(scores, axis=0).reshape(pixels.shape[:2])
    weights = np.where(mask > 0, np.exp(scores - np.where(mask > 0, scores, -1e9).max(1,
                                                                                 keepdims=True)), 0)
    weights /= weights.sum(1, keepdims=True)
    return np.argmax((log_probs * weights[..., None]).sum(1), axis=-1), scores


def test_an_export_with_the_head_is_an_image_model_that_tta_and_ensembles_take(
        exported, dataset, catalogue, tmp_path):
    run, plain = exported
    head_dir = tmp_path / "fusion"
    fusion.train(str(run), str(head_dir), epochs=1)
    head = _random_head(head_dir)
    out = tmp_path / "export"
    summary = exporting.export(str(run), str(out), fusion_dir=str(head_dir), tta="flip")
    assert summary["fusion"] and summary["tta"] == "flip"
    assert summary["product_pooling"] == "learned"
    export = export_format.load(str(out))
    assert models.SLOT_SCORE in export.image_model.output
    # The SavedModel's answers are the head's weighing of the flip views, by hand.
    s = export.image_size
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (3, 4, s, s, 3), dtype="uint8")
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], "float32")
    served = tf.saved_model.load(str(out)).signatures["predict_decoded"](
        images=tf.constant(pixels), mask=tf.constant(mask))["category_id"].numpy()
    base = rundir.float32_model(rundir.checkpoint_path(str(run), "best"))
    expected, scores = _by_hand(base, head, pixels, mask)
    assert np.ptp(scores[0]) > 1e-3  # the head's scores differ between images
    names = dataset.info.features["label"].names
    assert served.tolist() == [int(names[c]) for c in expected]
    # An ensemble member now: the ensemble carries the head's scores.
    ensemble = tmp_path / "ensemble"
    exporting.ensemble([str(out), str(plain)], str(ensemble))
    member = export_format.load(str(ensemble)).image_model
    flat = pixels.reshape(-1, s, s, 3)
    np.testing.assert_allclose(member(flat)[models.SLOT_SCORE].numpy(),
                               export.image_model(flat)[models.SLOT_SCORE].numpy(),
                               rtol=1e-4, atol=1e-5)
    # predict in a fresh process (the head's layers load with the image model), and the
    # SavedModel alone, in a process that cannot import tfcdisc, agree.
    sub = tmp_path / "submission.csv"
    test = str(catalogue[0] / "test.bson")
    done = subprocess.run([sys.executable, "-m", "tfcdisc.predict", f"--saved_model={out}",
                           f"--bson={test}", f"--output={sub}"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(sub)
    products = list(bsonfile.iter_products(test))[:12]
    got = serve_without_tfcdisc(out, [slots(p.images) for p in products])
    assert got["category_id"] == rows["category_id"][:12].tolist()


def test_a_head_of_another_checkpoint_or_version_and_an_old_export_are_refused(
        exported, tmp_path):
    run, plain = exported
    head_dir = tmp_path / "fusion"
    fusion.train(str(run), str(head_dir), epochs=1)
    config_path = head_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="learned from .* train a head on this run"):
        exporting.export(str(run), str(tmp_path / "export"), fusion_dir=str(head_dir))
    earlier = {k: v for k, v in config.items() if k != "head"}
    config_path.write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="earlier tfcdisc .* train it again"):
        exporting.export(str(run), str(tmp_path / "export"), fusion_dir=str(head_dir))
    # An export made with the earlier head (its own assets/fusion.keras): one line.
    old = tmp_path / "old"
    shutil.copytree(plain, old)
    (old / export_format.FUSION).write_bytes(b"an earlier head")
    meta = json.loads((old / export_format.METADATA).read_text())
    meta["files"][export_format.FUSION] = atomic.sha256(str(old / export_format.FUSION))
    (old / export_format.METADATA).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="earlier tfcdisc .* export the run with it"):
        export_format.load(str(old))
