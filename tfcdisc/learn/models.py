"""Keras models: a backbone by name, float32 heads, and the product-level combination.

The image model takes uint8 RGB (what `tfcdisc.learn.input_pipeline` makes: a quarter of the
bytes of float32 over the host-to-device link) of any size. Its first layer,
`ResizedCrop`, makes the model's view on the accelerator: in training a random resized
crop with a random flip, in inference the whole image resized to ``image_size``. Then the
backbone's own scaling, so a SavedModel needs nothing else.
Heads emit float32 logits even under mixed precision: ``label`` (the category) and,
optionally, ``label_level1`` / ``label_level2`` for the taxonomy's upper levels.

A product's images are combined by the masked mean of their log-probabilities
(`combine_log_probs`), the one function that evaluation, export and prediction share.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from tfcdisc import settings

_APPS = keras.applications
SLOT_SCORE = "slot_score"  # an image's say in its product (`product_model`)
PRODUCTS_SUFFIX = "_products"  # the name of a product model: its image model's, plus this


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build one backbone: constructor, input scaling, smallest input side."""

    make: Callable
    scaling: str  # "tf": [-1, 1]; "caffe": BGR minus ImageNet means; "raw": [0, 255]
    min_size: int = 32
    preprocessing_flag: bool = False  # takes include_preprocessing=True
    # The ImageNet weights file Keras downloads for include_top=False (what `--weights=PATH`
    # takes offline): its name in ~/.keras/models.
    imagenet_file: str | None = None


_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"
BACKBONES: dict[str, Backbone] = {
    "xception": Backbone(_APPS.Xception, "tf", 71, imagenet_file="xception" + _NOTOP),
    **{f"efficientnet_b{i}": Backbone(getattr(_APPS, f"EfficientNetB{i}"), "raw",
                                      imagenet_file=f"efficientnetb{i}_notop.h5")
       for i in range(8)},
    **{f"efficientnetv2_b{i}": Backbone(getattr(_APPS, f"EfficientNetV2B{i}"), "raw",
                                        preprocessing_flag=True,
                                        imagenet_file=f"efficientnetv2-b{i}_notop.h5")
       for i in range(4)},
    **{f"efficientnetv2_{s}": Backbone(getattr(_APPS, f"EfficientNetV2{s.upper()}"), "raw",
                                       preprocessing_flag=True,
                                       imagenet_file=f"efficientnetv2-{s}_notop.h5")
       for s in "sml"},
    **{f"convnext_{s}": Backbone(getattr(_APPS, f"ConvNeXt{s.capitalize()}"), "raw",
                                 preprocessing_flag=True, imagenet_file=f"convnext_{s}_notop.h5")
       for s in ("tiny", "small", "base")},
    "resnet50": Backbone(_APPS.ResNet50, "caffe", imagenet_file="resnet50" + _NOTOP),
    "mobilenetv3_small": Backbone(
        _APPS.MobileNetV3Small, "raw", preprocessing_flag=True,
        imagenet_file="weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
    "mobilenetv3_large": Backbone(
        _APPS.MobileNetV3Large, "raw", preprocessing_flag=True,
        imagenet_file="weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
    "small_cnn": Backbone(None, "unit", 16),
    # A KerasHub image backbone by preset (`--hub_preset`): its own converter's scaling.
    "keras_hub": Backbone(None, "hub", 16),
}


def is_imagenet_file(weights: str) -> bool:
    """A keras.applications weights file (``*_notop.h5``, legacy HDF5), not a run's
    ``.weights.h5`` or ``.keras``."""
    return weights.endswith(".h5") and not weights.endswith(".weights.h5")


def _imagenet_backbone(backbone: str, spec: Backbone, kwargs: dict, path: str) -> keras.Model:
    """The backbone initialised from Keras's ImageNet weights file at ``path`` (local or
    gs://), with no network: for runtimes without access to Keras's download host.

    Raises:
      ValueError: the file is not this backbone's: one line naming it and, where its name
        is another backbone's file, that backbone.
    """
    from tfcdisc.catalogue import atomic
    if spec.make is None:
        raise ValueError(f"--weights={path}: {backbone} has no ImageNet weights; use "
                         "--weights=none")
    try:
        with atomic.local_copy(path) as local:
            return spec.make(**kwargs, weights=local)
    except (ValueError, KeyError, OSError) as e:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        fits = [b for b, s in BACKBONES.items() if s.imagenet_file == name]
        hint = (f"it is Keras's file for --backbone={fits[0]}" if fits else
                f"{backbone}'s is Keras's {spec.imagenet_file}")
        raise ValueError(f"--weights={path}: not the ImageNet weights of {backbone} "
                         f"({_first_line(e)}); {hint}") from None


@keras.saving.register_keras_serializable("tfcdisc")
class HubScaling(layers.Layer):
    """A KerasHub preset's input scaling: [0, 255] pixels times ``scale`` plus ``offset``
    (each a number or one per channel, or None), as its `ImageConverter` does after
    resizing (the view layer has resized already)."""

    def __init__(self, scale=None, offset=None, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.offset = scale, offset

    def call(self, x):
        if self.scale is not None:
            x = x * ops.convert_to_tensor(self.scale, dtype=x.dtype)
        if self.offset is not None:
            x = x + ops.convert_to_tensor(self.offset, dtype=x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def load_model(path: str) -> keras.Model:
    """A local ``.keras`` file, uncompiled; KerasHub imported first where it holds a
    KerasHub backbone."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        import_hub_if_used(z.read("config.json").decode())
    return keras.saving.load_model(path, compile=False)


def import_hub_if_used(config_text: str) -> None:
    """Imports KerasHub where a saved model's config names its layers (their classes
    register on import), with the install line where it is missing."""
    if '"keras_hub' in config_text:
        _keras_hub("this model holds a KerasHub backbone")


def _keras_hub(why: str):
    """The keras_hub module, or one line saying ``why`` it is needed and how to get it."""
    try:
        import keras_hub
    except ImportError:
        raise ValueError(f"{why}: pip install 'tfcdisc[hub]' (or keras-hub)") from None
    return keras_hub


def _hub_backbone(preset: str | None, weights: str):
    """(backbone, scaling) of a KerasHub preset: its architecture, its weights (
    ``weights``: "imagenet" the preset's own, "none" none, a preset folder that folder's)
    and its image converter's scaling, scaled as its library scales.

    Raises:
      ValueError: no preset, KerasHub missing, or a preset KerasHub cannot load (one line).
    """
    if not preset:
        raise ValueError("--backbone=keras_hub needs --hub_preset=NAME or a preset folder")
    keras_hub = _keras_hub("--backbone=keras_hub needs KerasHub")
    source = weights if weights not in ("none", "imagenet") else preset
    try:
        backbone = keras_hub.models.Backbone.from_preset(
            source, load_weights=weights != "none",
            dtype=keras.config.dtype_policy().name)
        converter = keras_hub.layers.ImageConverter.from_preset(source)
    except (ValueError, OSError, KeyError, FileNotFoundError) as e:
        raise ValueError(f"--hub_preset={preset}{'' if source == preset else f' --weights={source}'}: "
                         f"KerasHub cannot load it as an image backbone ({_first_line(e)}); "
                         "give a preset name of keras_hub.models.Backbone.presets or a "
                         "folder written by save_to_preset") from None
    scaling = HubScaling(_plain(converter.scale), _plain(converter.offset), name="scaling")
    return backbone, scaling


def _plain(value):
    """A converter's scale or offset as JSON: a float, a list of floats, or None."""
    if value is None:
        return None
    array = np.asarray(value, dtype="float64")
    return float(array) if array.ndim == 0 else [float(v) for v in array.ravel()]


def _interpolation(start, end, size: int, out: int):
    """[B, out, size] bilinear weights sampling [start, end) (fractions of ``size``)
    at ``out`` evenly spaced pixel centres; end < start mirrors the axis."""
    # A static size stays a Python int: JAX traces need a concrete arange length.
    grid = ops.arange(size if isinstance(size, int) else ops.cast(size, "int32"),
                      dtype="float32")
    size = ops.cast(size, "float32")
    centres = (ops.arange(out, dtype="float32") + 0.5) / out  # [out]
    pos = (start[:, None] + centres[None, :] * (end - start)[:, None]) * size - 0.5
    pos = ops.clip(pos, 0.0, size - 1.0)
    return ops.maximum(0.0, 1.0 - ops.abs(pos[:, :, None] - grid[None, None, :]))


@keras.saving.register_keras_serializable("tfcdisc")
class ResizedCrop(layers.Layer):
    """The model's view of a uint8 image batch, computed on the accelerator.

    Training: an Inception-style random resized crop (area fraction in
    ``[min_area, 1]``, aspect ratio in [1/max_aspect, max_aspect]) with a random
    left-right flip.
    Inference: the whole image, resized. Either way bilinear, as two small matrix
    products per image (XLA compiles them; ``crop_and_resize`` does not compile), to
    ``size`` x ``size`` float32 in [0, 255]. An input already of that size passes through
    untouched in inference.
    """

    def __init__(self, size: int, min_area: float = 0.5, max_aspect: float = 4 / 3,
                 seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # pixels stay exact under mixed precision
        super().__init__(**kwargs)
        self.size, self.min_area, self.max_aspect, self.seed = size, min_area, max_aspect, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        images = ops.cast(images, "float32")
        if not training and tuple(images.shape[1:3]) == (self.size, self.size):
            return images
        # Static on accelerators (fixed decode size); dynamic only in traced signatures.
        height = images.shape[1] or ops.shape(images)[1]
        width = images.shape[2] or ops.shape(images)[2]
        batch = ops.shape(images)[0]
        if training:
            u = keras.random.uniform((5, batch), seed=self.seed_generator)
            area = self.min_area + (1.0 - self.min_area) * u[0]
            # min_area 1: the full frame, only flipped (a fine-tune shows the model what
            # it sees at test time; a random aspect would still cut the frame).
            aspect = float(np.log(self.max_aspect)) if self.min_area < 1.0 else 0.0
            log_ratio = (u[1] * 2.0 - 1.0) * aspect
            h = ops.minimum(ops.sqrt(area / ops.exp(log_ratio)), 1.0)
            w = ops.minimum(ops.sqrt(area * ops.exp(log_ratio)), 1.0)
            y0, x0 = u[2] * (1.0 - h), u[3] * (1.0 - w)
            y1, x1 = y0 + h, x0 + w
            flip = u[4] < 0.5
            x0, x1 = ops.where(flip, x1, x0), ops.where(flip, x0, x1)
        else:
            y0 = x0 = ops.zeros((batch,))
            y1 = x1 = ops.ones((batch,))
        wy = _interpolation(y0, y1, height, self.size)  # [B, S, H]
        wx = _interpolation(x0, x1, width, self.size)  # [B, S, W]
        rows = ops.einsum("bsh,bhwc->bswc", wy, images)
        return ops.einsum("btw,bswc->bstc", wx, rows)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size, "min_area": self.min_area,
                "max_aspect": self.max_aspect, "seed": self.seed}


@keras.saving.register_keras_serializable("tfcdisc")
class CaffeScaling(layers.Layer):
    """ResNet50's ImageNet preprocessing (RGB -> BGR, minus the channel means)."""

    def call(self, x):
        return ops.flip(x, axis=-1) - ops.convert_to_tensor([103.939, 116.779, 123.68],
                                                            dtype=x.dtype)


@keras.saving.register_keras_serializable("tfcdisc")
class Mirror(layers.Layer):
    """The images seen in a mirror (left and right swapped): the second view of flip TTA."""

    def call(self, x):
        return ops.flip(x, axis=-2)


@keras.saving.register_keras_serializable("tfcdisc")
class MeanLogProbs(layers.Layer):
    """The mean of several views' log-probabilities (a geometric mean of probabilities;
    `top_k_of` renormalises it)."""

    def call(self, views):
        return ops.mean(ops.stack([ops.log_softmax(ops.cast(v, "float32"), axis=-1)
                                   for v in views]), axis=0)


def with_tta(image_model: keras.Model, tta: str) -> keras.Model:
    """``image_model`` averaged over test-time views: "flip" adds the mirrored image.

    The result is an image model like any other (uint8 in, ``label`` out, here as
    log-probabilities, its other outputs averaged), so every inference path runs it
    unchanged, on any device.
    """
    if tta not in settings.TTA_MODES:
        raise ValueError(f"--tta={tta}: choose from {', '.join(settings.TTA_MODES)}")
    if tta == "none":
        return image_model
    inputs = keras.Input(image_model.input.shape[1:], dtype=image_model.input.dtype,
                         name="image")
    views = [image_model(inputs), image_model(Mirror(name="mirror")(inputs))]
    # The label in log-probability space; any other output (a slot score, an embedding)
    # as the views' mean.
    outputs = {key: (MeanLogProbs if key == "label" else layers.Average)(
        dtype="float32", name=key)([v[key] for v in views]) for key in image_model.output}
    return keras.Model(inputs, outputs, name=f"{image_model.name}_flip_tta")


@keras.saving.register_keras_serializable("tfcdisc")
class WeightedMeanProbs(layers.Layer):
    """log of the weighted mean of several models' probabilities (weights sum to 1)."""

    def __init__(self, member_weights: list[float], **kwargs):
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]

    def call(self, logits):
        log_w = ops.log(ops.convert_to_tensor(self.member_weights, "float32"))
        stacked = ops.stack([ops.log_softmax(ops.cast(v, "float32"), axis=-1) for v in logits])
        return ops.logsumexp(stacked + log_w[:, None, None], axis=0)

    def get_config(self):
        return {**super().get_config(), "member_weights": self.member_weights}


def ensemble_model(image_models: list[keras.Model], weights: list[float]) -> keras.Model:
    """One image model whose ``label`` is the log of the weighted mean of the members'
    probabilities. Members may differ in backbone and input size: each resizes the
    images it is given in its own first layer."""
    total = float(sum(weights))
    inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
    members = [keras.Model(m.input, {key: m.output[key] for key in ("label", SLOT_SCORE)
                                     if key in m.output}, name=f"member_{i}")(inputs)
               for i, m in enumerate(image_models)]
    outputs = {"label": WeightedMeanProbs([w / total for w in weights], dtype="float32",
                                          name="label")([m["label"] for m in members])}
    scores = [m[SLOT_SCORE] for m in members if SLOT_SCORE in m]
    if scores:  # members trained on products: their mean say in the pooling
        outputs[SLOT_SCORE] = (layers.Average(dtype="float32", name=SLOT_SCORE)(scores)
                               if len(scores) > 1 else scores[0])
    return keras.Model(inputs, outputs, name="ensemble")


@keras.saving.register_keras_serializable("tfcdisc")
class SparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy from logits, with label smoothing, in float32.

    Keras's sparse loss has no label smoothing; one-hot labels would cost the input
    pipeline (and a TPU host) num_classes floats per image, so they are made here.
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0,
                 name: str = "sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        if not self.label_smoothing:
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
                                                                from_logits=True)
        return keras.losses.categorical_crossentropy(
            ops.one_hot(y_true, self.num_classes), y_pred, from_logits=True,
            label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable("tfcdisc")
class UndecodableImages(keras.metrics.Metric):
    """Training images TensorFlow could not decode in the epoch: the pipeline gives them
    weight 0 (`input_pipeline.train_dataset`), so this counts the zero weights. The build
    checks headers only, so this is where a garbled image is reported."""

    def __init__(self, name: str = "undecodable_images", **kwargs):
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", name="count",
                                       aggregation="sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            missed = ops.sum(ops.cast(ops.equal(sample_weight, 0), "float32"))
            self.count.assign_add(missed)

    def result(self):
        return ops.convert_to_tensor(self.count)

    def reset_state(self):
        self.count.assign(0.0)


def _small_cnn(input_shape, widths=(32, 64, 128, 256)) -> keras.Model:
    """A fast CNN for CPU demos and tests: conv-BN-ReLU blocks, then global pooling."""
    inputs = keras.Input(input_shape)
    x = inputs
    for i, w in enumerate(widths):
        x = layers.Conv2D(w, 3, strides=2 if i else 1, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(w, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x) if i < len(widths) - 1 else x
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="small_cnn")


def _scaling(kind: str):
    if kind == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, name="scaling")
    if kind == "unit":
        return layers.Rescaling(1 / 255.0, name="scaling")
    if kind == "caffe":
        return CaffeScaling(name="scaling")
    return None


def _set_bn_momentum(model: keras.Model, momentum: float) -> None:
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum
        elif isinstance(layer, keras.Model):
            _set_bn_momentum(layer, momentum)


def build_image_model(backbone: str, num_classes: int, *, image_size: int = 180,
                      weights: str = "none", num_level1: int = 0, num_level2: int = 0,
                      dropout: float = 0.2, bn_momentum: float | None = None,
                      crop_area: float = 0.5, seed: int | None = None,
                      slot_score: bool = False, hub_preset: str | None = None
                      ) -> keras.Model:
    """The per-image classifier: view, backbone, pooling, dropout, float32 logit heads.

    Args:
      backbone: a key of `BACKBONES`.
      num_classes: categories of the ``label`` head.
      image_size: side of the square input (Xception needs >= 71).
      weights: "none", "imagenet" (downloaded by Keras; needs a network), the path of
        Keras's ImageNet weights file for the backbone (``*_notop.h5``: the same weights
        offline), or of weights saved by a previous run (.weights.h5 or .keras).
      num_level1, num_level2: sizes of the auxiliary heads (0: no head).
      dropout: before the heads.
      bn_momentum: overrides BatchNormalization momentum. Short runs want a lower one
        (0.9), or the moving statistics lag the weights and inference mode scores far
        below training mode.
      crop_area: smallest area fraction of a training crop (`ResizedCrop`).
      seed: of the training crops.
      hub_preset: the KerasHub preset (a name or a folder) of ``backbone="keras_hub"``.
      slot_score: adds the ``slot_score`` output, each image's say in its product's pooling
        (`product_model`), zero-initialised: a product starts as the mean of its images'
        log-probabilities.

    Raises:
      ValueError: unknown backbone, too small an input, unknown weights.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    if image_size < spec.min_size:
        raise ValueError(f"{backbone} needs --image_size >= {spec.min_size}, not {image_size}")
    if weights not in ("none", "imagenet") and not tf.io.gfile.exists(weights):
        raise ValueError(f"--weights={weights}: not 'none', 'imagenet' nor an existing file")
    hub_folder = backbone == "keras_hub" and tf.io.gfile.isdir(weights)
    inputs = keras.Input((None, None, 3), dtype="uint8", name="image")
    x = ResizedCrop(image_size, crop_area, seed=seed, name="view")(inputs)
    base, scaling = _backbone(backbone, spec, (image_size, image_size, 3), weights,
                              hub_preset, hub_folder)
    if scaling is not None:
        x = scaling(x)
    features = base(x)
    if len(features.shape) == 4:  # a KerasHub CNN's feature map
        features = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    elif len(features.shape) == 3:  # a KerasHub transformer's tokens
        features = layers.GlobalAveragePooling1D(name="avg_pool")(features)
    pooled = features
    if dropout:
        features = layers.Dropout(dropout, name="dropout")(features)
    outputs = {"label": layers.Dense(num_classes, dtype="float32", name="label")(features)}
    if num_level1:
        outputs["label_level1"] = layers.Dense(num_level1, dtype="float32",
                                               name="label_level1")(features)
    if num_level2:
        outputs["label_level2"] = layers.Dense(num_level2, dtype="float32",
                                               name="label_level2")(features)
    if slot_score:
        outputs[SLOT_SCORE] = slot_score_of(pooled, outputs["label"])
    model = keras.Model(inputs, outputs, name=f"{backbone}_classifier")
    if bn_momentum is not None:
        _set_bn_momentum(model, bn_momentum)
    if weights not in ("none", "imagenet") and not is_imagenet_file(weights) and \
            not hub_folder:
        _load_weights(model, weights)
    return model


def _backbone(name: str, spec: Backbone, shape: tuple, weights: str,
              hub_preset: str | None, hub_folder: bool):
    """(backbone, input scaling or None): built with the weights it starts from (a
    previous run's are loaded later, into the whole model; ``hub_folder``: ``weights`` is
    a KerasHub preset folder)."""
    if spec.scaling == "hub":
        return _hub_backbone(hub_preset, weights if weights in ("none", "imagenet") or
                             hub_folder else "none")
    scaling = _scaling(spec.scaling)
    kwargs = dict(include_top=False, input_shape=shape, pooling="avg")
    if spec.preprocessing_flag:
        kwargs["include_preprocessing"] = True
    if is_imagenet_file(weights):
        return _imagenet_backbone(name, spec, kwargs, weights), scaling
    if spec.make is None:
        if weights == "imagenet":
            raise ValueError("small_cnn has no ImageNet weights; use --weights=none")
        return _small_cnn(shape), scaling
    if weights != "imagenet":
        return spec.make(**kwargs, weights=None), scaling
    try:
        return spec.make(**kwargs, weights="imagenet"), scaling
    except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception for a download
        if "URL fetch failure" not in str(e):
            raise
        raise ValueError(
            f"--weights=imagenet: Keras could not download {spec.imagenet_file or name}'s "
            f"ImageNet weights ({str(e).rsplit(' -- ', 1)[-1]}); without access to "
            "storage.googleapis.com, fetch that file where there is a network and give its "
            "path, --weights=PATH (docs/troubleshooting.md), or start from none, "
            "--weights=none (several points lower)") from None


SLOT_SCALE = 10.0  # the slot score's pace: a fine-tune's low learning rate moved it too
# little (weights within 0.4-0.6 of a two-image product's after 2 epochs at 0.001)


@keras.saving.register_keras_serializable("tfcdisc")
class Confidence(layers.Layer):
    """[B, C] logits -> [B, 2]: the top log-probability and the negative entropy, how
    sure an image is of its own answer (the pooling's evidence beside its features)."""

    def call(self, logits):
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        return ops.stack([ops.max(log_probs, axis=-1),
                          ops.sum(ops.exp(log_probs) * log_probs, axis=-1)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2)


def slot_score_of(features, logits):
    """Each image's say in its product (`slot_weights`): a linear score of its features
    and its confidence, zero at the start (the mean of log-probabilities), moved
    `SLOT_SCALE` times faster than the other weights. A product phase learns it with the
    backbone; the fusion head (`fusion`) learns it on held-out products."""
    evidence = layers.Concatenate(dtype="float32", name="slot_evidence")(
        [features, Confidence(dtype="float32", name="slot_confidence")(logits)])
    score = layers.Dense(1, dtype="float32", kernel_initializer="zeros",
                         name="slot_dense")(evidence)
    return layers.Rescaling(SLOT_SCALE, dtype="float32", name=SLOT_SCORE)(score)


def _first_line(error: Exception) -> str:
    """Keras's words for a weights mismatch, first line only (they run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_weights(model: keras.Model, path: str) -> None:
    """``--weights=PATH`` of a previous run into ``model``; a file of another shape (other
    class counts, backbone or heads) is one line naming the file, not Keras's words."""
    try:
        if path.endswith(".weights.h5"):
            model.load_weights(path)
        else:
            from tfcdisc.catalogue import atomic
            with atomic.local_copy(path) as local:
                copy_weights(image_model_of(load_model(local)), model)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--weights={path}: its weights do not fit this model "
                         f"({model.name}, {model.count_params():,} parameters): "
                         f"{_first_line(e)}; give "
                         "weights of a run with the same --backbone, heads and dataset "
                         "categories") from None


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Every weighted layer of ``source`` into the layer of that name in ``target``; only
    a product phase's pooling (``slot_*`` layers) may be the target's own, kept at their
    start.

    Raises:
      ValueError: a layer of ``source`` is missing in ``target``, has other shapes, or
        ``target`` has another weighted layer (a head) ``source`` lacks.
    """
    own = {layer.name for layer in source.layers if layer.weights}
    extra = [layer.name for layer in target.layers if layer.weights and
             layer.name not in own and not layer.name.startswith("slot_")]
    if extra:
        raise ValueError(f"{target.name} has {', '.join(extra)}, which {source.name} lacks")
    for layer in source.layers:
        if not layer.weights:
            continue
        try:
            twin = target.get_layer(layer.name)
        except ValueError:
            raise ValueError(f"layer {layer.name} is not in {target.name}") from None
        twin.set_weights(layer.get_weights())


# --------------------------------------------------------------------------- products
# A product's images pooled into one answer: the layers of a product phase's network, and
# the pooling that the scoring rule (`product_predictor.product_scores`) applies to any
# model's images. Written with keras.ops: one definition under JAX and TensorFlow.


def slot_weights(mask, slot_scores=None):
    """[B, N] weights of a product's images, summing to 1 over its real ones: equal, or a
    softmax of ``slot_scores`` [B, N] over them (all zeros: equal). A product with no real
    image gets zeros."""
    mask = ops.cast(mask, "float32")
    if slot_scores is None:
        return mask / ops.maximum(ops.sum(mask, axis=1, keepdims=True), 1.0)
    scores = ops.where(mask > 0, ops.cast(slot_scores, "float32"), -1e9)
    scores = scores - ops.max(scores, axis=1, keepdims=True)
    weights = ops.exp(scores) * mask
    return weights / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-30)


def combine_log_probs(log_probs, mask, slot_scores=None):
    """Masked mean over a product's images: [B, N, C] log-probs, [B, N] mask -> [B, C];
    weighted by the model's learned ``slot_scores`` [B, N] where it has them
    (`slot_weights`).

    A product with no valid image gets all zeros (callers treat it as unscored).
    """
    weights = ops.cast(slot_weights(mask, slot_scores), log_probs.dtype)
    return ops.sum(log_probs * weights[..., None], axis=1)


@keras.saving.register_keras_serializable("tfcdisc")
class ImageSlots(layers.Layer):
    """[P, N, H, W, 3] product images -> [P * N, H, W, 3]: one backbone pass over a batch
    of products, whose slots are all real images (`input_pipeline.product_train_dataset`
    groups products by image count, so none goes to padding)."""

    def call(self, images):
        return ops.reshape(images, (-1, *images.shape[2:]))

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[2:])


@keras.saving.register_keras_serializable("tfcdisc")
class ProductPooling(layers.Layer):
    """[P * N, C] per-image logits, [P * N, 1] slot scores, [P, N] mask -> [P, C] product
    log-probabilities: the images' log-probabilities weighted by `slot_weights` (with the
    scores' zero start, their mean: the scoring rule of an image-trained model)."""

    def call(self, inputs):
        logits, scores, mask = inputs
        shape = ops.shape(mask)
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        log_probs = ops.reshape(log_probs, (shape[0], shape[1], logits.shape[-1]))
        scores = ops.reshape(ops.cast(scores, "float32"), (shape[0], shape[1]))
        return combine_log_probs(log_probs, mask, scores)

    def compute_output_shape(self, input_shape):
        return (input_shape[2][0], input_shape[0][-1])


def product_model(image_model: keras.Model) -> keras.Model:
    """The end-to-end product model of a product phase (``--train_on=products``):
    {images [P, N, H, W, 3] uint8, mask [P, N]} -> each head of ``image_model`` per
    product, as log-probabilities pooled over its images. ``image_model`` needs the
    ``slot_score`` output; it is what the export keeps (`image_model_of`), so a product
    model is scored by the same rule as any other (`product_predictor.product_scores`)."""
    images = keras.Input((None, None, None, 3), dtype="uint8", name="images")
    mask = keras.Input((None,), name="mask")
    per_image = image_model(ImageSlots(name="slots")(images))
    scores = per_image[SLOT_SCORE]
    outputs = {key: ProductPooling(dtype="float32", name=f"pool_{key}")(
        [value, scores, mask]) for key, value in per_image.items() if key != SLOT_SCORE}
    return keras.Model({"images": images, "mask": mask}, outputs,
                       name=image_model.name + PRODUCTS_SUFFIX)


def image_model_of(model: keras.Model) -> keras.Model:
    """The image model inside a product model (`product_model`), or ``model`` itself."""
    if model.name.endswith(PRODUCTS_SUFFIX):
        return model.get_layer(model.name[:-len(PRODUCTS_SUFFIX)])
    return model
