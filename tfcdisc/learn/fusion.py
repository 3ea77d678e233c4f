"""The fusion head: each image's say in its product, learned on products the image model
never trained on.

A product's answer is the mean of its images' log-probabilities, which gives a noise
image, a logo or a packaging shot as much say as a clear view. The head learns a score
per image from its embedding and its confidence (`models.slot_score_of`: the scores'
softmax over a product's images weighs their log-probabilities; zero scores are the
plain mean), with the image model frozen, on the validation split: the training split's
products were memorised (there every image looks certain of its right answer, so nothing
tells which to trust), the validation split's were not. The split is cut in two by
position: the head learns on three products in four that have two images or more, and
its epoch is chosen on the fourth, where the run's own answers are the score to beat:
the head starts from them (zero scores, the mean; a product phase's own scores where it
learned some) and stays there when no epoch beats them.

Exported (`with_head`), the head is the image model's ``slot_score`` output, as a product
phase's is: the product scoring rule, flip TTA, ensembles, the duplicate table and every
predictor take it as they are. The embeddings are cached once per run and checkpoint
(`cache_features`: [4, D] float16 and the mask per product, about 10 KB a product for
D = 1280). TPU rules hold: four slots always (static shapes), padding masked.
"""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, folder_lock
from tfcdisc import settings
from tfcdisc.learn import input_pipeline, models, product_predictor, rundir

EMBEDDING = "embedding"
CACHE_KEY = "made_from.json"  # beside the cached embeddings: which run and data made them
FUSION_MODEL = "fusion.keras"  # the slot scorer alone: (features, logits) -> score
HEAD = "slot_score on held-out products"  # config.json's "head": what this version trains
SLOTS = input_pipeline.MAX_IMAGES
CHECK_EVERY = 4  # every 4th validation product chooses the epoch; the others train


def with_embedding(image_model: keras.Model) -> keras.Model:
    """The image model with a second output: the features its label head reads."""
    features = image_model.get_layer("label").input
    return keras.Model(image_model.input,
                       {"label": image_model.output["label"], EMBEDDING: features},
                       name=f"{image_model.name}_embedding")


def scorer(dim: int, classes: int) -> keras.Model:
    """(features [N, dim], logits [N, classes]) -> slot score [N, 1], zero at the start."""
    features = keras.Input((dim,), name="features")
    logits = keras.Input((classes,), name="logits")
    return keras.Model([features, logits], models.slot_score_of(features, logits),
                       name="fusion_head")


def with_scorer(image_model: keras.Model, head: keras.Model) -> keras.Model:
    """``image_model`` whose ``slot_score`` output is the ``head``'s (any score it had, a
    product phase's, is replaced): an image model like any other."""
    outputs = {key: value for key, value in image_model.output.items()
               if key != models.SLOT_SCORE}
    outputs[models.SLOT_SCORE] = head([image_model.get_layer("label").input,
                                       image_model.output["label"]])
    return keras.Model(image_model.input, outputs, name=f"{image_model.name}_fused")


def training_model(label: keras.layers.Dense, head: keras.Model) -> keras.Model:
    """{embedding [B, 4, D], mask [B, 4]} -> {label: product log-probabilities [B, C]}:
    the run's own label layer (frozen) per slot, pooled by the ``head``'s scores as the
    scoring rule pools them (`models.ProductPooling`)."""
    dim, classes = label.kernel.shape
    embedding = keras.Input((SLOTS, dim), name=EMBEDDING)
    mask = keras.Input((SLOTS,), name="mask")
    flat = models.ImageSlots(name="slots")(embedding)
    frozen = keras.layers.Dense(classes, dtype="float32", trainable=False, name="label")
    logits = frozen(flat)
    frozen.set_weights(label.get_weights())
    pooled = models.ProductPooling(dtype="float32", name="pool_label")(
        [logits, head([flat, logits]), mask])
    return keras.Model({EMBEDDING: embedding, "mask": mask}, {"label": pooled},
                       name="fusion")


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
                   splits=("validation",), batch_size: int = 256) -> dict:
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
    """Caches the run's embeddings of the validation split (once) and learns the head on
    them; writes ``fusion_dir/fusion.keras`` (the epoch that scores best on the checking
    quarter, or the start) and ``fusion_dir/config.json``; returns the latter. One
    writer per fusion dir (`folder_lock`)."""
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
    held_out = builder.info.splits["validation"].num_examples
    if held_out < 2 * CHECK_EVERY:
        raise ValueError(f"{data_dir}: its validation split has {held_out} products; the "
                         "fusion head learns on products the run did not train on: build "
                         "the dataset with a validation split (validation_size of a few "
                         "hundred or more) and train the run on it")
    image_model = rundir.float32_model(rundir.checkpoint_path(model_dir, checkpoint))
    label = image_model.get_layer("label")
    dim, classes = (int(n) for n in label.kernel.shape)
    folder = f"{fusion_dir.rstrip('/')}/features"
    key = _cache_key(model_dir, checkpoint, builder)
    cached = tf.io.gfile.exists(f"{folder}/validation.tfrecord")
    if cached and atomic.read_json(f"{folder}/{CACHE_KEY}") != key:
        logging.warning("%s holds embeddings of another run, checkpoint or dataset; "
                        "embedding again", folder)
        cached = False
    if not cached:
        if tf.io.gfile.exists(f"{folder}/{CACHE_KEY}"):
            tf.io.gfile.remove(f"{folder}/{CACHE_KEY}")
        cache_features(image_model, builder, run["train"]["image_size"], folder)
        atomic.write(f"{folder}/{CACHE_KEY}", json.dumps(key, indent=2))  # last: complete
    if keras.backend.backend() == "jax":
        # The head is small: one device, so that the checking part's last, partial batch
        # needs no split over several.
        keras.distribution.set_distribution(None)
    keras.utils.set_random_seed(seed)

    products = features_dataset(folder, "validation", dim).enumerate()
    fit = products.filter(lambda i, p: (i % CHECK_EVERY != CHECK_EVERY - 1)
                          & (tf.reduce_sum(p[0]["mask"]) >= 2)).map(lambda i, p: p)
    check = products.filter(lambda i, p: i % CHECK_EVERY == CHECK_EVERY - 1).map(
        lambda i, p: p)
    n_fit, n_check = (int(ds.reduce(0, lambda n, _: n + 1)) for ds in (fit, check))
    fit, check = (ds.apply(tf.data.experimental.assert_cardinality(n))  # Keras's epochs
                  for ds, n in ((fit, n_fit), (check, n_check)))
    if not n_fit:
        raise ValueError(f"{data_dir}: no validation product has two images or more; the "
                         "fusion head weighs a product's images, so it has nothing to learn")
    batch_size = min(batch_size, n_fit)  # static batches: drop_remainder below

    def labelled(ds):
        return ds.map(lambda x, y: (x, {"label": y}))

    head = scorer(dim, classes)
    if models.SLOT_SCORE in image_model.output:  # a product phase's: its own scores first
        head.get_layer("slot_dense").set_weights(
            image_model.get_layer("slot_dense").get_weights())
    model = training_model(label, head)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=1e-4),
                  loss={"label": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                  metrics={"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]},
                  jit_compile="auto")
    check_ds = labelled(check).batch(batch_size)
    start = float(model.evaluate(check_ds, verbose=0, return_dict=True)["accuracy"])
    best = {"accuracy": start, "epoch": 0, "weights": head.get_weights()}  # the run's own

    def keep_best(epoch, logs):
        if logs["val_accuracy"] > best["accuracy"]:
            best.update(accuracy=float(logs["val_accuracy"]), epoch=epoch + 1,
                        weights=head.get_weights())

    train_ds = labelled(fit).shuffle(min(n_fit, 65536), seed=seed).batch(
        batch_size, drop_remainder=True).prefetch(2)
    history = model.fit(train_ds, validation_data=check_ds, epochs=epochs, verbose=0,
                        shuffle=False,  # shuffled above: Keras cannot shuffle a tf.data
                        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=keep_best)]
                        ).history
    head.set_weights(best["weights"])
    with atomic.via_local(f"{fusion_dir.rstrip('/')}/{FUSION_MODEL}") as local:
        head.save(local)
    summary = {"head": HEAD, "model_dir": model_dir, "data_dir": data_dir,
               "checkpoint": checkpoint,
               "checkpoint_sha256": key["checkpoint_sha256"],
               "embedding_dim": dim, "classes": classes, "epochs": epochs,
               "learned_on": n_fit, "checked_on": n_check,
               "chosen_epoch": best["epoch"],
               "check_product_accuracy": best["accuracy"],
               "check_product_accuracy_of_the_run": start,
               "check_product_accuracy_by_epoch":
                   [float(a) for a in history["val_accuracy"]]}
    atomic.write(f"{fusion_dir.rstrip('/')}/config.json", json.dumps(summary, indent=2))
    return summary


def load_config(fusion_dir: str) -> dict:
    return atomic.load_json(f"{fusion_dir.rstrip('/')}/config.json",
                            f"{fusion_dir}: no fusion head here (no config.json); give the "
                            "--fusion_dir of `python -m tfcdisc.train_fusion`",
                            "train the fusion head again")


def with_head(image_model: keras.Model, fusion_dir: str, model_dir: str) -> keras.Model:
    """``image_model`` (the checkpoint the head learned from) with the head of
    ``fusion_dir`` as its ``slot_score`` (`with_scorer`).

    Raises:
      ValueError: the head is of an earlier tfcdisc, or of another run or checkpoint.
    """
    config = load_config(fusion_dir)
    if config.get("head") != HEAD:
        raise ValueError(f"{fusion_dir}: a fusion head of an earlier tfcdisc (a class head "
                         "learned on the training split's embeddings), which this version "
                         "no longer runs; train it again: python -m tfcdisc.train_fusion "
                         f"--model_dir={model_dir} --fusion_dir={fusion_dir}")
    path = rundir.checkpoint_path(model_dir, config["checkpoint"])
    if config["checkpoint_sha256"] != atomic.sha256(path):
        raise ValueError(f"{fusion_dir}: its head learned from {config['model_dir']} "
                         f"({config['checkpoint']} checkpoint as it was then), not {path} "
                         "as it is now; train a head on this run (into another "
                         "--fusion_dir to keep this one): python -m tfcdisc.train_fusion "
                         f"--model_dir={model_dir} --fusion_dir={fusion_dir}")
    with atomic.local_copy(f"{fusion_dir.rstrip('/')}/{FUSION_MODEL}") as local:
        head = keras.saving.load_model(local, compile=False)
    return with_scorer(image_model, head)
