"""A product-level fusion head: a second stage that reads a product's image embeddings
together, instead of averaging its images' log-probabilities (2017's 2nd place "fuse"
networks reached about 0.78 product accuracy that way).

On a finished run: its frozen image model (the checkpoint, float32) gains a second
output, the features its label head reads (`with_embedding`); every product of the train
and validation splits is embedded once, centre view, and cached as TFRecords in the
fusion dir (`cache_features`: [4, D] float16 and the mask per product, about 10 KB a
product for D = 1280); a small model (`fusion_model`: masked attention pooling and the
masked mean over the image slots, plus the image count) is trained on the cache
(`train`). An export given the fusion dir runs both, with the same signatures.

TPU rules hold: four slots always (static shapes), padding masked, no py_function.
"""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from tfcdisc.catalogue import atomic, folder_lock
from tfcdisc import settings
from tfcdisc.learn import input_pipeline, models, product_predictor, rundir

EMBEDDING = "embedding"
CACHE_KEY = "made_from.json"  # beside the cached embeddings: which run and data made them
FUSION_MODEL = "fusion.keras"
SLOTS = input_pipeline.MAX_IMAGES


def with_embedding(image_model: keras.Model) -> keras.Model:
    """The image model with a second output: the features its label head reads."""
    features = image_model.get_layer("label").input
    return keras.Model(image_model.input,
                       {"label": image_model.output["label"], EMBEDDING: features},
                       name=f"{image_model.name}_embedding")


@keras.saving.register_keras_serializable("tfcdisc")
class MaskedPooling(layers.Layer):
    """[B, 4, H] slot features, [B, 4, 1] attention scores, [B, 4] mask -> [B, 2H + 5]:
    attention-weighted sum and mean over the real slots, and the image count (one-hot)."""

    def call(self, inputs):
        h, scores, mask = inputs
        attended = ops.sum(h * models.slot_weights(mask, scores[..., 0])[..., None], axis=1)
        mean = ops.sum(h * models.slot_weights(mask)[..., None], axis=1)
        count = ops.sum(mask, axis=-1, keepdims=True)
        return ops.concatenate(
            [attended, mean, ops.one_hot(ops.cast(count[:, 0], "int32"), SLOTS + 1)], axis=-1)


def fusion_model(num_classes: int, dim: int, hidden: int = 256,
                 dropout: float = 0.2) -> keras.Model:
    """{embedding [B, 4, dim], mask [B, 4]} -> {label: product logits [B, num_classes]}."""
    embedding = keras.Input((SLOTS, dim), name=EMBEDDING)
    mask = keras.Input((SLOTS,), name="mask")
    h = layers.Dense(hidden, activation="gelu", name="slot")(embedding)
    scores = layers.Dense(1, name="attention")(h)
    x = MaskedPooling(name="pool")([h, scores, mask])
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(hidden, activation="gelu", name="mix")(x)
    label = layers.Dense(num_classes, dtype="float32", name="label")(x)
    return keras.Model({EMBEDDING: embedding, "mask": mask}, {"label": label}, name="fusion")


# --------------------------------------------------------------------------- feature cache


def _feature_spec() -> dict:
    return {EMBEDDING: tf.io.FixedLenFeature([], tf.string),
            "mask": tf.io.FixedLenFeature([SLOTS], tf.float32),
            "label": tf.io.FixedLenFeature([], tf.int64)}


def _cache_key(model_dir: str, checkpoint: str, builder) -> dict:
    """What the cached embeddings were made from: the run, the checkpoint's own bytes
    (a rerun or a resumed run changes them) and the dataset."""
    return {"model_dir": model_dir, "checkpoint": checkpoint,
            "checkpoint_sha256": atomic.sha256(rundir.checkpoint_path(model_dir, checkpoint)),
            "dataset": builder.data_dir}


def cache_features(image_model: keras.Model, builder, image_size: int, folder: str,
                   splits=("train", "validation"), batch_size: int = 256) -> dict:
    """Embeds every product of ``splits`` once and writes ``folder/{split}.tfrecord``;
    returns {split: products}. The embedding width is ``image_model``'s."""
    model = with_embedding(image_model)
    tf.io.gfile.makedirs(folder)
    strategy = product_predictor.default_strategy()
    static = product_predictor.static_shapes(strategy)
    _, embed = product_predictor.compile_step(
        lambda batch: {EMBEDDING: product_predictor.image_outputs(
            model, batch["images"], None if static else batch["mask"])[EMBEDDING]},
        [model], strategy)

    counts = {}
    for split in splits:
        n = builder.info.splits[split].num_examples
        batches = product_predictor.distribute_products(
            strategy, lambda: input_pipeline.split_products(builder, split), batch_size,
            image_size, n)
        counts[split] = 0
        with atomic.via_local(f"{folder}/{split}.tfrecord") as local:
            with tf.io.TFRecordWriter(local) as f:
                for batch in batches:
                    out = embed(batch)
                    emb = out[EMBEDDING].astype(np.float16)
                    keep = out["valid"] > 0
                    masks, labels = out["mask"], out["label"]
                    for e, m, y in zip(emb[keep], masks[keep], labels[keep]):
                        f.write(tf.train.Example(features=tf.train.Features(feature={
                            EMBEDDING: tf.train.Feature(bytes_list=tf.train.BytesList(
                                value=[e.tobytes()])),
                            "mask": tf.train.Feature(float_list=tf.train.FloatList(value=m)),
                            "label": tf.train.Feature(int64_list=tf.train.Int64List(
                                value=[int(y)]))})).SerializeToString())
                        counts[split] += 1
    return counts


def features_dataset(folder: str, split: str, dim: int) -> tf.data.Dataset:
    """({embedding [4, dim] float32, mask [4]}, label) per cached product."""
    def parse(record):
        ex = tf.io.parse_single_example(record, _feature_spec())
        emb = tf.reshape(tf.cast(tf.io.decode_raw(ex[EMBEDDING], tf.float16), tf.float32),
                         [SLOTS, dim])
        return {EMBEDDING: emb, "mask": ex["mask"]}, tf.cast(ex["label"], tf.int32)

    return tf.data.TFRecordDataset(f"{folder}/{split}.tfrecord").map(
        parse, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- training


_DEFAULT = settings.FusionSettings  # one default per setting (its flag's)


def train(model_dir: str, fusion_dir: str, *, data_dir: str | None = None,
          checkpoint: str = _DEFAULT.checkpoint, epochs: int = _DEFAULT.epochs,
          batch_size: int = _DEFAULT.batch_size, learning_rate: float = _DEFAULT.learning_rate,
          seed: int = _DEFAULT.seed,
          lock_lease_minutes: float = _DEFAULT.lock_lease_minutes) -> dict:
    """Caches the run's embeddings (once) and trains the fusion head on them; writes
    ``fusion_dir/fusion.keras`` (the epoch with the best validation product accuracy)
    and ``fusion_dir/config.json``; returns the latter. One writer per fusion dir
    (`folder_lock`)."""
    run = rundir.load_config(model_dir)  # not a run: refused before anything is written
    with folder_lock.hold(f"{fusion_dir.rstrip('/')}/{rundir.LOCK_FILE}",
                          "tfcdisc.train_fusion", fusion_dir, lock_lease_minutes):
        return _train(model_dir, run, fusion_dir, data_dir=data_dir, checkpoint=checkpoint,
                      epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                      seed=seed)


def _train(model_dir: str, run: dict, fusion_dir: str, *, data_dir: str | None,
           checkpoint: str, epochs: int, batch_size: int, learning_rate: float,
           seed: int) -> dict:
    own = data_dir in (None, run["train"]["data_dir"])  # the run's own data: its config
    data_dir = data_dir or run["train"]["data_dir"]
    builder = input_pipeline.load_builder(
        data_dir, run["train"].get("dataset_config") if own else None)
    rundir.check_dataset(model_dir, data_dir, input_pipeline.fingerprint(builder),
                         taxonomy_only=not own)
    image_model = rundir.float32_model(rundir.checkpoint_path(model_dir, checkpoint))
    dim = int(image_model.get_layer("label").input.shape[-1])
    classes = builder.info.features["label"].num_classes
    folder = f"{fusion_dir.rstrip('/')}/features"
    key = _cache_key(model_dir, checkpoint, builder)
    cached = all(tf.io.gfile.exists(f"{folder}/{s}.tfrecord") for s in ("train", "validation"))
    if cached and atomic.read_json(f"{folder}/{CACHE_KEY}") != key:
        logging.warning("%s holds embeddings of another run, checkpoint or dataset; "
                        "embedding again", folder)
        cached = False
    if not cached:
        if tf.io.gfile.exists(f"{folder}/{CACHE_KEY}"):
            tf.io.gfile.remove(f"{folder}/{CACHE_KEY}")
        cache_features(image_model, builder, run["train"]["image_size"], folder)
        atomic.write(f"{folder}/{CACHE_KEY}", json.dumps(key, indent=2))  # last: complete
    n_train = builder.info.splits["train"].num_examples
    batch_size = min(batch_size, n_train)  # static batches: drop_remainder below
    if keras.backend.backend() == "jax":
        # The head is small: one device, so that validation's last, partial batch needs
        # no split over several.
        keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(seed)

    def labelled(ds):
        return ds.map(lambda x, y: (x, {"label": y}))

    train_ds = labelled(features_dataset(folder, "train", dim)).shuffle(
        min(n_train, 65536), seed=seed).batch(batch_size, drop_remainder=True).prefetch(2)
    val_ds = labelled(features_dataset(folder, "validation", dim)).batch(batch_size)
    model = fusion_model(classes, dim)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=1e-4),
                  loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                  metrics={"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
                  jit_compile="auto")
    path = f"{fusion_dir.rstrip('/')}/{FUSION_MODEL}"
    with atomic.via_local(path) as local:
        best = keras.callbacks.ModelCheckpoint(local, monitor="val_accuracy", mode="max",
                                               save_best_only=True)
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[best],
                            verbose=0).history
    accuracy = [float(a) for a in history["val_accuracy"]]
    base = _run_validation_accuracy(model_dir)
    summary = {"model_dir": model_dir, "data_dir": data_dir, "checkpoint": checkpoint,
               "embedding_dim": dim, "classes": classes, "epochs": epochs,
               "validation_product_accuracy": max(accuracy),
               "validation_product_accuracy_by_epoch": accuracy,
               "run_validation_product_accuracy": base}
    atomic.write(f"{fusion_dir.rstrip('/')}/config.json", json.dumps(summary, indent=2))
    return summary


def _run_validation_accuracy(model_dir: str) -> float | None:
    """The run's own best validation product accuracy (mean of log-probabilities)."""
    import csv
    path = f"{model_dir.rstrip('/')}/history.csv"
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        values = [float(r["val_product_accuracy"]) for r in csv.DictReader(f)
                  if r.get("val_product_accuracy")]
    return max(values) if values else None


def load_config(fusion_dir: str) -> dict:
    return atomic.load_json(f"{fusion_dir.rstrip('/')}/config.json",
                            f"{fusion_dir}: no fusion head here (no config.json); give the "
                            "--fusion_dir of `python -m tfcdisc.train_fusion`",
                            "train the fusion head again")
