"""Backbones, heads and the product-level combination."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfcdisc.learn import models, product_predictor


def test_every_backbone_is_a_train_flag_choice_and_a_keras_application():
    from tfcdisc import settings
    assert tuple(models.BACKBONES) == settings.BACKBONE_NAMES
    assert all(spec.make is None or callable(spec.make) for spec in models.BACKBONES.values())


# One backbone of each family (a family's members are built by one Keras constructor
# each; building all 19 took minutes of the suite).
@pytest.mark.parametrize("backbone", ["xception", "efficientnet_b0", "efficientnetv2_b0",
                                      "convnext_tiny", "resnet50", "mobilenetv3_small",
                                      "small_cnn"])
def test_each_backbone_family_builds_at_180(backbone):
    model = models.build_image_model(backbone, 7, image_size=180, num_level1=3, num_level2=5)
    assert model.input_shape == (None, None, None, 3) and model.input.dtype == "uint8"
    assert {k: tuple(v.shape) for k, v in model.output.items()} == {
        "label": (None, 7), "label_level1": (None, 3), "label_level2": (None, 5)}
    assert all(model.get_layer(k).dtype_policy.compute_dtype == "float32"
               for k in model.output)


# The family's own preprocessing, as keras.applications documents it for its weights.
_PREPROCESS = {"xception": keras.applications.xception.preprocess_input,
               "efficientnet": keras.applications.efficientnet.preprocess_input,
               "efficientnetv2": keras.applications.efficientnet_v2.preprocess_input,
               "convnext": keras.applications.convnext.preprocess_input,
               "resnet50": keras.applications.resnet50.preprocess_input,
               "mobilenetv3": keras.applications.mobilenet_v3.preprocess_input}


@pytest.mark.parametrize("family", sorted(_PREPROCESS))
def test_each_family_scales_its_input_as_its_library_does(family):
    """What the backbone sees of a [0, 255] image equals its library's preprocess_input
    (the scaling layer, or the backbone's own preprocessing layers, which keras.applications
    then documents as a pass-through)."""
    name = next(b for b in models.BACKBONES if b.startswith(family))
    spec = models.BACKBONES[name]
    image = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    scaling = models._scaling(spec.scaling)
    ours = np.asarray(scaling(image)) if scaling is not None else image
    np.testing.assert_allclose(ours, np.asarray(_PREPROCESS[family](image.copy())), atol=1e-4)


def _keras_weights_file(model: keras.Model, path) -> None:
    """``model``'s weights in the legacy HDF5 layout of Keras's downloaded ImageNet files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def test_imagenet_weights_from_a_file_need_no_network(dataset, tmp_path, monkeypatch):
    import socket
    from conftest import train_config
    from tfcdisc.learn import training
    source = keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                                 input_shape=(32, 32, 3), pooling="avg")
    first = next(v for v in source.weights if len(v.shape) == 4)
    first.assign(np.random.default_rng(1).normal(size=first.shape).astype("float32"))
    path = tmp_path / models.BACKBONES["mobilenetv3_small"].imagenet_file
    _keras_weights_file(source, path)

    def offline(*args, **kwargs):
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", offline)
    model = models.build_image_model("mobilenetv3_small", 5, image_size=32, weights=str(path))
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    loaded = next(v for v in backbone.weights if len(v.shape) == 4)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(first))
    training.train(train_config(dataset, tmp_path / "run", backbone="mobilenetv3_small",
                                weights=str(path), steps_per_epoch=1))
    # Without a network, --weights=imagenet is one line naming the file and both ways out
    # (it was Keras's traceback ending in "URL fetch failure").
    from keras.src.backend import config as keras_config
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))  # nothing cached
    with pytest.raises(ValueError, match=r"^--weights=imagenet: Keras could not download "
                       r"efficientnetv2-b0_notop.h5's ImageNet weights \(.*--weights=PATH.*"
                       r"--weights=none"):
        models.build_image_model("efficientnetv2_b0", 5, image_size=32, weights="imagenet")
    # Another backbone's file is named as such, in one line.
    with pytest.raises(ValueError, match="not the ImageNet weights of efficientnetv2_b0 .*"
                                         "Keras's file for --backbone=mobilenetv3_small"):
        models.build_image_model("efficientnetv2_b0", 5, image_size=32, weights=str(path))


def test_heads_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_image_model("small_cnn", 4, image_size=32)
        out = model(np.zeros((2, 32, 32, 3), np.uint8))
        assert out["label"].dtype == tf.float32
        assert model.get_layer("small_cnn").compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bad_arguments_say_why(tmp_path):
    with pytest.raises(ValueError, match="xception needs --image_size >= 71"):
        models.build_image_model("xception", 3, image_size=64)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        models.build_image_model("vgg", 3)
    with pytest.raises(ValueError, match="not 'none', 'imagenet' nor an existing file"):
        models.build_image_model("small_cnn", 3, weights=str(tmp_path / "missing.h5"))


def test_weights_from_a_path(tmp_path):
    a = models.build_image_model("small_cnn", 3, image_size=32)
    path = str(tmp_path / "w.weights.h5")
    a.save_weights(path)
    b = models.build_image_model("small_cnn", 3, image_size=32, weights=path)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(a(x)["label"], b(x)["label"], rtol=1e-5)


def test_product_combination_is_the_masked_mean_of_log_probabilities():
    model = models.build_image_model("small_cnn", 6, image_size=32, dropout=0.0)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 4, 32, 32, 3), dtype=np.uint8)
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    logits = model(images.reshape(12, 32, 32, 3), training=False)["label"].numpy()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_probs = log_probs.reshape(3, 4, 6)
    expected = (log_probs * mask[..., None]).sum(1) / mask.sum(1)[:, None]
    combined = models.combine_log_probs(
        product_predictor.image_outputs(model, images)["label"], mask)
    np.testing.assert_allclose(combined, expected, rtol=1e-4, atol=1e-5)
    out = product_predictor.product_scores(
        product_predictor.image_outputs(model, images), mask, 3)
    assert out["top_k_classes"].numpy()[:, 0].tolist() == expected.argmax(1).tolist()
    probs = np.exp(expected) / np.exp(expected).sum(1, keepdims=True)
    np.testing.assert_allclose(out["top_k_probabilities"][:, 0], probs.max(1), rtol=1e-4)
    # Padded slots have no class: -1.
    assert out["image_top1"].numpy().tolist() == np.where(mask > 0, log_probs.argmax(-1),
                                                          -1).tolist()


def test_label_smoothing_loss():
    loss = models.SparseCrossentropy(4, label_smoothing=0.1)
    y, logits = np.array([1, 3]), np.random.default_rng(2).normal(size=(2, 4)).astype("float32")
    expected = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(4)[y], logits)
    np.testing.assert_allclose(loss(y, logits), expected, rtol=1e-5)
    plain = models.SparseCrossentropy(4)
    np.testing.assert_allclose(plain(y, logits), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)(y, logits), rtol=1e-5)
    assert models.SparseCrossentropy.from_config(loss.get_config()).label_smoothing == 0.1


def test_skipping_padded_slots_changes_no_answer():
    model = models.build_image_model("small_cnn", 5, image_size=32, dropout=0.0)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 4, 32, 32, 3), dtype=np.uint8)
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], np.float32)
    full = product_predictor.product_scores(
        product_predictor.image_outputs(model, images), mask, 3)
    skip = product_predictor.product_scores(
        product_predictor.image_outputs(model, images, mask), mask, 3)
    for key in ("top_k_classes", "image_top1"):
        valid = mask.sum(1) > 0 if key == "top_k_classes" else mask > 0
        np.testing.assert_array_equal(full[key].numpy()[valid], skip[key].numpy()[valid])
    np.testing.assert_allclose(full["top_k_probabilities"].numpy()[mask.sum(1) > 0],
                               skip["top_k_probabilities"].numpy()[mask.sum(1) > 0], rtol=1e-5)


def _smooth_images(n=4, size=48, seed=0):
    """Smooth uint8 images (bilinear resampling of noise would only measure aliasing)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 6, 6, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(small, [size, size]), tf.uint8)


def test_the_view_in_inference_is_a_plain_resize():
    view = models.ResizedCrop(32)
    images = _smooth_images()
    same = models.ResizedCrop(48)(images, training=False)
    np.testing.assert_array_equal(same, tf.cast(images, tf.float32))  # untouched at size
    expected = tf.image.resize(tf.cast(images, tf.float32), [32, 32])
    np.testing.assert_allclose(view(images, training=False), expected, atol=0.02)


def test_the_training_view_crops_flips_and_varies():
    images = _smooth_images()
    # --crop_area=1 (a full-frame fine-tune): the whole frame whatever the aspect range;
    # only flips vary.
    view = models.ResizedCrop(32, min_area=1.0, seed=4)
    out = view(tf.concat([images] * 4, 0), training=True).numpy()
    plain = tf.image.resize(tf.cast(images, tf.float32), [32, 32]).numpy()
    flips = []
    for got, want in zip(out, np.concatenate([plain] * 4)):
        flips.append(np.allclose(got, want[:, ::-1], atol=0.02))
        assert flips[-1] or np.allclose(got, want, atol=0.02)
    assert 0 < sum(flips) < len(flips)
    crops = models.ResizedCrop(32, min_area=0.3, seed=5)
    a, b = crops(images, training=True).numpy(), crops(images, training=True).numpy()
    assert a.shape == (4, 32, 32, 3) and not np.allclose(a, b)
    assert a.min() >= 0.0 and a.max() <= 255.0


def test_the_view_compiles_with_xla():
    view = models.ResizedCrop(40, seed=1)
    train = tf.function(lambda x: view(x, training=True), jit_compile=True)
    infer = tf.function(lambda x: view(x, training=False), jit_compile=True)
    images = _smooth_images(size=64)
    assert train(images).shape == (4, 40, 40, 3) and infer(images).shape == (4, 40, 40, 3)


def test_adamw_decays_no_bias_and_no_normalisation_weight():
    from tfcdisc import settings
    from tfcdisc.learn import training
    model = models.build_image_model("small_cnn", 3, image_size=32)
    cfg = settings.TrainConfig(data_dir="d", model_dir="m", optimizer="adamw",
                               learning_rate=256.0, warmup_epochs=0, weight_decay=0.5)
    optimizer = training._optimizer(cfg, batch=1, total_steps=10**6, steps_per_epoch=1)
    before = {v.path: np.asarray(v).copy() for v in model.trainable_variables}
    optimizer.apply([keras.ops.zeros(v.shape) for v in model.trainable_variables],
                    model.trainable_variables)  # no gradient: only the decay moves weights
    for v in model.trainable_variables:
        kept = np.allclose(np.asarray(v), before[v.path])
        assert kept == any(n in v.path for n in ("bias", "gamma", "beta")), v.path
