"""The end-to-end product model (`--train_on=products`): batches of one image count, a
learned pooling that starts as the mean of log-probabilities, and its export."""

import collections
import json

import keras
import numpy as np
import pytest

from conftest import epoch_scalars, last_json, product_batches, run_training, train_config
from tfcdisc.learn import input_pipeline, models, product_predictor, training


def test_product_batches_hold_one_image_count_and_every_product_once(dataset):
    """No slot is padding; without repeat, every product is read once, less only the
    last partial batch of each image count."""
    ds = input_pipeline.product_train_dataset(
        dataset, 24, input_pipeline.PipelineOptions(seed=0, decode_size=48), repeat=False,
        multiple=2)
    seen, shapes = collections.Counter(), set()
    for x, labels, weights in ds:
        products, count = x["images"].shape[:2]
        assert products == input_pipeline.products_per_batch(24, count, 2)
        assert x["images"].shape[2:] == (48, 48, 3) and x["mask"].shape == (products, count)
        assert np.all(x["mask"].numpy() == 1) and np.all(weights.numpy() == 1)
        shapes.add((products, count))
        seen[count] += products
    counts = collections.Counter()
    for p in input_pipeline.split_products(dataset, "train"):
        counts[int(np.sum(p["images"].numpy() != b""))] += 1
    for n, total in counts.items():  # at most one partial batch left out per count
        assert 0 <= total - seen[n] < input_pipeline.products_per_batch(24, n, 2)
    assert len(shapes) == len(counts)  # one static shape per image count


def test_zero_slot_scores_pool_as_the_mean_and_learned_ones_weigh_images():
    rng = np.random.default_rng(0)
    log_probs = np.log(rng.dirichlet(np.ones(5), size=(3, 4))).astype("float32")
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], "float32")
    mean = np.asarray(models.combine_log_probs(log_probs, mask))
    zero = np.asarray(models.combine_log_probs(log_probs, mask, np.zeros((3, 4), "float32")))
    np.testing.assert_allclose(zero, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean[0], log_probs[0, :2].mean(0), rtol=1e-6)
    assert not np.any(mean[2])  # no image: unscored
    # A large score on one real image: the product is that image; padding never counts.
    scores = np.array([[0, 30, 99, 99], [0, 0, 0, 0], [0, 0, 0, 0]], "float32")
    weighted = np.asarray(models.combine_log_probs(log_probs, mask, scores))
    np.testing.assert_allclose(weighted[0], log_probs[0, 1], rtol=1e-4, atol=1e-5)


def test_a_product_phase_learns_its_pooling_and_exports_through_the_same_rule(
        dataset, tmp_path):
    """An image run, then a product phase from its best: the backbone and the pooling
    train on whole products; export (with flip TTA) scores as the phase validated."""
    from tfcdisc.serve import exporting
    run = tmp_path / "run"
    training.train(train_config(dataset, run, epochs=1, steps_per_epoch=4))
    start = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    with pytest.raises(ValueError, match="at least 4 images per replica"):
        training.train(train_config(dataset, run, phase="products", train_on="products",
                                    global_batch_size=3))
    result = training.train(train_config(dataset, run, phase="products", train_on="products",
                                         epochs=2, steps_per_epoch=4, global_batch_size=24,
                                         learning_rate=0.02, warmup_epochs=0))
    phase = run / "phases" / "products"
    assert [r.split(",")[0] for r in (phase / "history.csv").read_text().splitlines()[1:]] \
        == ["0", "1"]
    tuned = keras.saving.load_model(phase / "checkpoints" / "last.keras", compile=False)
    image_model = models.image_model_of(tuned)
    assert image_model.name == start.name and models.SLOT_SCORE in image_model.output
    moved = [not np.allclose(a, b) for a, b in zip(start.get_layer("label").get_weights(),
                                                   image_model.get_layer("label").get_weights())]
    assert any(moved)  # the backbone's head trained on products
    assert np.any(image_model.get_layer("slot_dense").get_weights()[0])  # learned
    assert len(result.history["accuracy"]) == 2  # product accuracy in training, per epoch
    summary = exporting.export(str(run), str(tmp_path / "export"), phase="products",
                               checkpoint="last", tta="flip")
    assert summary["product_pooling"] == "learned"
    # The SavedModel's own graph against the phase's image model under the same rule.
    import tensorflow as tf
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["predict_decoded"]
    names = dataset.info.features["label"].names
    plain = product_predictor.ProductPredictor(models.with_tta(image_model, "flip"))
    for batch in product_batches(dataset, "validation", 16, 32).take(2):
        ids = served(images=batch["images"], mask=batch["mask"])["category_id"].numpy()
        top = plain.step(batch)["top_k_classes"].numpy()[:, 0]
        real = batch["valid"].numpy() > 0  # filler products get the fallback class
        assert [int(names[c]) for c in top[real]] == ids[real].tolist()
    # A fusion head on the phase starts from the phase's own scores, and keeps them when
    # nothing beats them on the held-out quarter (here: nothing is learned).
    from tfcdisc.learn import fusion
    head = fusion.train(str(phase), str(tmp_path / "fusion"), checkpoint="last", epochs=1,
                        learning_rate=0.0)
    assert head["chosen_epoch"] == 0
    saved = keras.saving.load_model(tmp_path / "fusion" / fusion.FUSION_MODEL, compile=False)
    for got, own in zip(saved.get_layer("slot_dense").get_weights(),
                        image_model.get_layer("slot_dense").get_weights()):
        np.testing.assert_array_equal(got, own)


def test_a_product_phase_trains_under_jax_on_two_devices(dataset, tmp_path):
    """From an image run's best (Keras files: trained here on TensorFlow)."""
    run = tmp_path / "run"
    training.train(train_config(dataset, run, epochs=1, steps_per_epoch=1))
    done = run_training(train_config(dataset, run, phase="products", train_on="products",
                                     epochs=1, steps_per_epoch=4, global_batch_size=16),
                        backend="jax")
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    assert result["distribution"] == "backend jax, DataParallel over 2 cpu devices"
    assert np.isfinite(result["loss"]).all()
    assert result["validation"]["products"] == dataset.info.splits["validation"].num_examples
    config = json.load(open(run / "phases" / "products" / "config.json"))
    assert config["train"]["train_on"] == "products"
    # JAX's curves too: 4 steps, --log_every_steps=100.
    logs = run / "phases" / "products" / "logs"
    assert epoch_scalars(logs / "validation")["epoch_product_accuracy"] == [0]
    assert epoch_scalars(logs / "train")["epoch_accuracy"] == [0]


def test_flip_tta_and_ensembles_keep_the_learned_pooling():
    """Each view's and each member's say is averaged; a member without one is left out."""
    def member(slot_score, seed):
        keras.utils.set_random_seed(seed)
        model = models.build_image_model("small_cnn", 3, image_size=32, slot_score=slot_score)
        if slot_score:
            layer = model.get_layer("slot_dense")
            layer.set_weights([np.random.default_rng(seed).normal(size=w.shape)
                               for w in layer.get_weights()])
        return model
    a, b, plain = member(True, 1), member(True, 2), member(False, 3)
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype="uint8")
    mirrored = images[:, :, ::-1]
    tta = models.with_tta(a, "flip")(images)[models.SLOT_SCORE]
    np.testing.assert_allclose(tta, (a(images)[models.SLOT_SCORE] +
                                     a(mirrored)[models.SLOT_SCORE]) / 2, rtol=1e-5, atol=1e-5)
    both = models.ensemble_model([a, b, plain], [1, 1, 1])(images)[models.SLOT_SCORE]
    np.testing.assert_allclose(both, (a(images)[models.SLOT_SCORE] +
                                      b(images)[models.SLOT_SCORE]) / 2, rtol=1e-5, atol=1e-5)
    assert models.SLOT_SCORE not in models.ensemble_model([plain], [1]).output
