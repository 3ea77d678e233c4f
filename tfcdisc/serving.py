"""Writes and reads exports: a self-contained SavedModel plus the Keras image model.

The SavedModel needs neither tfcdisc nor category_names.csv: JPEG decoding, resizing,
the product-level combination and the class -> category_id table are in the graph,
and the taxonomy is embedded. Signatures:

  serving_default(images: string [N, 4]) -> category_id int64 [N], probability [N],
      top_k_category_id int64 [N, k], top_k_probability [N, k], image_category_id [N, 4]
      A product's JPEG bytes, padded with empty strings. A product with no image gets
      the most frequent training category and probability 0.
  predict_decoded(images: uint8 [N, 4, S, S, 3], mask: float32 [N, 4]) -> the same
      For callers that decode in their own parallel pipeline; uint8 keeps decoded
      batches a quarter of the size of float32. Without the bytes it cannot use a
      duplicate table.
  metadata() -> taxonomy_json, image_size, top_k, fallback_category_id.

The checkpoint's own model (its architecture read from the file) is loaded outside any
distribution strategy in float32, so a model trained on a TPU in bfloat16 exports the same
way.

What an export may add, all in the graph and in the assets: flip TTA or an ensemble
(inside the image model, `models.with_tta`, `models.ensemble_model`), a duplicate-image
table (``assets/duplicates.npz``, `tfcdisc.duplicates`), a fusion head
(``assets/fusion.keras``, `tfcdisc.fusion`).

Beside it, ``assets/image_model.keras`` and ``assets/tfcdisc.json`` (image size, top k,
fallback, taxonomy, how the export was made) let `tfcdisc.predict` and
`tfcdisc.evaluate` run the same computation under a distribution strategy (a TPU,
several GPUs) or on JAX, which a loaded SavedModel cannot.

The SavedModel is always TensorFlow's own graph, written by a TensorFlow-backend process
(a JAX process exports through one). An export is written whole or not at all (a
temporary sibling swapped into place), by one writer at a time, and records the SHA-256
of each file, which every loader checks (`verify`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcdisc import atomic, duplicates, folder_lock, graph_check, input_pipeline, models
from tfcdisc import product_eval
from tfcdisc import training
from tfcdisc import taxonomy as taxonomy_lib

KERAS_MODEL = "assets/image_model.keras"
METADATA = "assets/tfcdisc.json"
DUPLICATES = "assets/duplicates.npz"
FUSION = "assets/fusion.keras"


class ProductClassifier(tf.Module):
    """The exported module: image model + decoding + product combination + id table."""

    def __init__(self, image_model: keras.Model, taxonomy: taxonomy_lib.Taxonomy,
                 image_size: int, top_k: int, fallback_class: int,
                 duplicate_table: duplicates.Table | None = None,
                 fusion_model: keras.Model | None = None):
        super().__init__()
        self.image_model = image_model
        self.fusion_model = fusion_model
        self._duplicates = None
        if duplicate_table is not None and duplicate_table.weight > 0:
            self._duplicates = (duplicates.static_table(duplicate_table),
                                tf.constant(duplicate_table.top_class),
                                tf.constant(duplicate_table.share),
                                float(duplicate_table.weight))
        self.image_size = image_size
        self.top_k = top_k
        self.fallback_class = fallback_class
        self._category_ids = tf.constant(taxonomy.category_ids, tf.int64)
        self._fallback_id = tf.constant(int(taxonomy.category_ids[fallback_class]), tf.int64)
        self._taxonomy_json = tf.constant(json.dumps(taxonomy.to_dict(), ensure_ascii=False))
        s = image_size
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, input_pipeline.MAX_IMAGES], tf.string, name="images")])
        self.predict_decoded = tf.function(self._predict, input_signature=[
            tf.TensorSpec([None, input_pipeline.MAX_IMAGES, s, s, 3], tf.uint8,
                          name="images"),
            tf.TensorSpec([None, input_pipeline.MAX_IMAGES], tf.float32, name="mask")])
        self.metadata = tf.function(self._metadata, input_signature=[])

    def _serve(self, images):
        decoded = input_pipeline.decode_products(images, self.image_size)
        found = {}
        if self._duplicates is not None:  # the bytes are here: look the images up
            lookup, top_class, share, _ = self._duplicates
            found = duplicates.features(lookup, top_class, share, images)
        return self._predict(decoded, input_pipeline.padding_mask(images), **found)

    def _predict(self, images, mask, duplicate_class=None, duplicate_share=None):
        out = models.product_scores(
            models.image_outputs(self.image_model, images, mask), mask, self.top_k,
            fallback_class=self.fallback_class, fusion=self.fusion_model,
            duplicate_class=duplicate_class, duplicate_share=duplicate_share,
            duplicate_weight=self._duplicates[3] if self._duplicates else 0.0)
        image_ids = tf.where(mask > 0, tf.gather(self._category_ids,
                                                 tf.maximum(out["image_top1"], 0)),
                             tf.constant(-1, tf.int64))
        top_ids = tf.gather(self._category_ids, out["top_k_classes"])
        return {
            "category_id": top_ids[:, 0],
            "probability": out["top_k_probabilities"][:, 0],
            "top_k_category_id": top_ids,
            "top_k_probability": out["top_k_probabilities"],
            "image_category_id": image_ids,
        }

    def _metadata(self):
        return {"taxonomy_json": self._taxonomy_json,
                "image_size": tf.constant(self.image_size, tf.int32),
                "top_k": tf.constant(self.top_k, tf.int32),
                "fallback_category_id": self._fallback_id}


def checkpoint_path(model_dir: str, which: str = "best") -> str:
    path = f"{model_dir.rstrip('/')}/checkpoints/{which}.keras"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: no {which} checkpoint; has `python -m tfcdisc.train "
                                f"--model_dir={model_dir}` finished an epoch?")
    return path


def _in_float32(config):
    """A serialized model's config with every layer's dtype policy made float32."""
    if isinstance(config, list):
        return [_in_float32(c) for c in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy":
        return {**config, "config": {**config["config"], "name": "float32"}}
    return {k: _in_float32(v) for k, v in config.items()}


def float32_model(checkpoint: str) -> keras.Model:
    """The checkpoint's own model, in float32: its architecture is read from the file, not
    rebuilt from flags. A rebuild can differ: Keras adds a layer to EfficientNet B0-B7
    only when it is built with ``weights="imagenet"``, which a rebuild cannot ask for."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "m.keras")
        tf.io.gfile.copy(checkpoint, local)
        with zipfile.ZipFile(local) as z:
            config = json.loads(z.read("config.json"))
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy("float32")  # portable serving on any device
        try:
            model = keras.saving.deserialize_keras_object(_in_float32(config))
        finally:
            keras.mixed_precision.set_global_policy(previous)
        model.load_weights(local)
    return model


def export(model_dir: str, export_dir: str, *, top_k: int = 5, checkpoint: str = "best",
           tta: str = "none", duplicates_from: str | None = None,
           fusion_dir: str | None = None) -> dict:
    """Writes the SavedModel; returns a summary (paths, classes, fallback category).

    ``tta="flip"`` averages each image's original and mirrored views in log-probability
    space (`models.with_tta`): twice the compute, the same signatures.
    ``duplicates_from`` (a built dataset of the same taxonomy) embeds a duplicate-image
    table made from its train split, blended with a weight chosen on its validation
    split (`tfcdisc.duplicates`; the weight is 0, the table off, unless it helped).
    ``fusion_dir`` (of `tfcdisc.train_fusion`) combines each product's image embeddings
    with its fusion head instead of averaging log-probabilities; it uses the checkpoint
    the head was trained on. With ``duplicates_from`` as well, the table is blended with
    the head's product predictions (`duplicates.blend_product`).
    """
    if keras.backend.backend() != "tensorflow":
        return _in_tensorflow_process("export", model_dir=model_dir, export_dir=export_dir,
                                      top_k=top_k, checkpoint=checkpoint, tta=tta,
                                      duplicates_from=duplicates_from, fusion_dir=fusion_dir)
    with _writer(export_dir):  # a busy or read-only export dir is refused before the work
        return _export(model_dir, export_dir, top_k=top_k, checkpoint=checkpoint, tta=tta,
                       duplicates_from=duplicates_from, fusion_dir=fusion_dir)


def _export(model_dir: str, export_dir: str, *, top_k: int, checkpoint: str, tta: str,
            duplicates_from: str | None, fusion_dir: str | None) -> dict:
    config = training.load_config(model_dir)
    cfg = training.TrainConfig(**config["train"])
    builder = input_pipeline.load_builder(cfg.data_dir, cfg.dataset_config)
    meta = builder.info.metadata or {}
    if "taxonomy" not in meta:
        raise ValueError(f"{cfg.data_dir}: the dataset's metadata has no taxonomy; rebuild "
                         "it with this version's tfds_builder/cdiscount")
    taxonomy = taxonomy_lib.Taxonomy.from_dict(meta["taxonomy"])
    counts = np.asarray(meta.get("class_counts") or [], np.int64)
    if counts.size != taxonomy.num_classes:
        logging.warning("no class counts in the dataset metadata: falling back to class 0 for "
                        "products without images")
        counts = np.zeros(taxonomy.num_classes)
    built_size = (meta.get("build_options") or {}).get("image_size")
    fusion_head = None
    if fusion_dir:
        from tfcdisc import fusion
        if tta != "none":
            raise ValueError("--fusion_dir reads embeddings of the plain model: it does not "
                             "combine with --tta yet")
        checkpoint = fusion.load_config(fusion_dir)["checkpoint"]
        fusion_head = float32_model(f"{fusion_dir.rstrip('/')}/{fusion.FUSION_MODEL}")
    image_model = models.with_tta(float32_model(checkpoint_path(model_dir, checkpoint)), tta)
    if fusion_head is not None:
        image_model = fusion.with_embedding(image_model)
    table = None
    if duplicates_from:
        table = duplicate_table(duplicates_from, taxonomy, image_model, cfg.image_size,
                                fusion=fusion_head)
    summary = write(export_dir, image_model, taxonomy, image_size=cfg.image_size, top_k=top_k,
                    fallback_class=int(np.argmax(counts)),
                    max_image_pixels=int(np.prod(built_size)) if built_size else None,
                    duplicate_table=table, fusion_model=fusion_head, tta=tta)
    return {**summary, "checkpoint": checkpoint}


def _in_tensorflow_process(command: str, **flags) -> dict:
    """Runs ``python -m tfcdisc.<command>`` (TensorFlow backend) and returns its JSON
    summary: a SavedModel is TensorFlow's graph, which a process whose Keras runs on
    JAX cannot trace (Keras's own JAX export would wrap it in XlaCallModule ops, which
    TF Serving and TF.js may not run)."""
    import subprocess
    import sys
    args = [sys.executable, "-m", f"tfcdisc.{command}",
            *(f"--{name}={value}" for name, value in flags.items() if value is not None)]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
        raise ValueError(f"{command} (in a TensorFlow-backend process) failed: {last}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def duplicate_table(data_dir: str, taxonomy: taxonomy_lib.Taxonomy, image_model: keras.Model,
                    image_size: int, batch_size: int = 256,
                    fusion: keras.Model | None = None) -> duplicates.Table:
    """The table of ``data_dir``'s train split (never validation or test), its blend weight
    chosen by product accuracy on the validation split (with a ``fusion`` head, blended
    with the head's product predictions)."""
    builder = input_pipeline.load_builder(data_dir)
    theirs = (builder.info.metadata or {}).get("taxonomy")
    if theirs is None or not np.array_equal(
            taxonomy_lib.Taxonomy.from_dict(theirs).category_ids, taxonomy.category_ids):
        raise ValueError(f"--duplicates_from={data_dir}: not built with the run's taxonomy")
    table = duplicates.build(input_pipeline.image_labels(builder, "train"))
    grid = duplicates.WEIGHT_GRID
    predictor = product_eval.ProductPredictor(image_model, 1, weight_grid=grid, fusion=fusion)
    hits = np.zeros(len(grid))
    n = builder.info.splits["validation"].num_examples
    batches = product_eval.distribute_products(
        tf.distribute.get_strategy(), lambda: input_pipeline.split_products(builder, "validation"),
        batch_size, image_size, n, duplicate_table=table)
    for out in predictor.batches(batches):
        hits += (out["top1_by_weight"] == out["label"][:, None]).sum(axis=0)
    table.weight = duplicates.choose_weight(list(hits), grid)
    table.accuracy_by_weight = {str(w): float(h / max(n, 1)) for w, h in zip(grid, hits)}
    logging.info("duplicate table: %d unique images of %d; validation accuracy by weight %s; "
                 "weight %.1f", len(table), table.images, table.accuracy_by_weight,
                 table.weight)
    return table


def write(export_dir: str, image_model: keras.Model, taxonomy: taxonomy_lib.Taxonomy, *,
          image_size: int, top_k: int, fallback_class: int,
          max_image_pixels: int | None = None,
          duplicate_table: duplicates.Table | None = None,
          fusion_model: keras.Model | None = None, **extra) -> dict:
    """Writes an export of ``image_model`` (uint8 images in, ``label`` logits or
    log-probabilities out): the SavedModel, the Keras model and the metadata that
    `load` reads. ``extra`` goes into the metadata (how the model was made)."""
    top_k = min(top_k, taxonomy.num_classes)
    module = ProductClassifier(image_model, taxonomy, image_size, top_k, fallback_class,
                               duplicate_table, fusion_model)
    extra["fusion"] = fusion_model is not None
    if duplicate_table is not None:
        extra["duplicates"] = {
            "unique_images": len(duplicate_table), "training_images": duplicate_table.images,
            "weight": duplicate_table.weight,
            "validation_accuracy_by_weight": duplicate_table.accuracy_by_weight}
    meta = {"image_size": image_size, "top_k": top_k, "fallback_class": fallback_class,
            "fallback_category_id": int(taxonomy.category_ids[fallback_class]),
            # predict refuses headers declaring more (the catalogue's own frame size)
            "max_image_pixels": max_image_pixels, **extra, "taxonomy": taxonomy.to_dict()}
    with _whole_or_not_at_all(export_dir) as target:
        tf.saved_model.save(module, target, signatures={
            "serving_default": module.serve, "predict_decoded": module.predict_decoded,
            "metadata": module.metadata})
        with tempfile.TemporaryDirectory() as tmp:
            image_model.save(os.path.join(tmp, "m.keras"))
            atomic.copy(os.path.join(tmp, "m.keras"), f"{target}/{KERAS_MODEL}")
            if fusion_model is not None:
                fusion_model.save(os.path.join(tmp, "f.keras"))
                atomic.copy(os.path.join(tmp, "f.keras"), f"{target}/{FUSION}")
        if duplicate_table is not None:
            atomic.write(f"{target}/{DUPLICATES}", duplicate_table.to_bytes())
        meta["files"] = checksums(target)  # every loader checks them (`verify`)
        # Last: an export is one only once its metadata is there (`read_metadata`).
        atomic.write(f"{target}/{METADATA}", json.dumps(meta, ensure_ascii=False))
    return {"export_dir": export_dir, "classes": taxonomy.num_classes,
            "image_size": image_size, "top_k": top_k, **extra,
            "fallback_category_id": meta["fallback_category_id"]}


@contextlib.contextmanager
def _whole_or_not_at_all(export_dir: str):
    """Where to write an export so that a kill, a full disk or a crash at any byte
    leaves the previous export (or none), never a mix of two.

    Local folders: a temporary sibling, swapped into place when complete (what a killed
    export left beside it is removed by the next one). Cloud Storage has no folder
    rename: the old metadata goes first and the new is written last, so a half-written
    export is refused by every loader rather than used.

    Raises:
      ValueError: ``export_dir`` holds files and is not an export (nothing is written).
    """
    final = export_dir.rstrip("/")
    with _writer(final), _into_place(final) as target:
        yield target


def _writer(export_dir: str):
    """The export dir's lock (`folder_lock`): one writer at a time, taken before the work
    and held (re-entered) while the files are written."""
    final = export_dir.rstrip("/")
    return folder_lock.hold(final + ".tfcdisc-writer.lock", "tfcdisc.export", final)


@contextlib.contextmanager
def _into_place(final: str):
    if tf.io.gfile.isdir(final) and tf.io.gfile.listdir(final) and \
            not tf.io.gfile.exists(f"{final}/{METADATA}") and \
            not tf.io.gfile.exists(f"{final}/saved_model.pb"):
        raise ValueError(f"{final} holds files and is not a tfcdisc export; give an "
                         "empty or new --export_dir (nothing was written)")
    if "://" in final:
        if tf.io.gfile.exists(f"{final}/{METADATA}"):
            tf.io.gfile.remove(f"{final}/{METADATA}")
        yield final
        return
    parent, name = os.path.split(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # what killed exports into this folder left behind
        for mark in (".incomplete-", ".old-"):
            head, _, pid = stale.partition(mark)
            if head == name and pid.isdigit() and not folder_lock.pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    target, old = f"{final}.incomplete-{os.getpid()}", f"{final}.old-{os.getpid()}"
    shutil.rmtree(target, ignore_errors=True)
    try:
        yield target
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(target, final)
    shutil.rmtree(old, ignore_errors=True)


def ensemble(members: Sequence[str], export_dir: str,
             weights: Sequence[float] | None = None, duplicates_from: str | None = None
             ) -> dict:
    """One self-contained export that averages its members' probabilities (with
    ``weights``, equal by default). Members are exports of the same taxonomy; they may
    differ in backbone and image size and carry their own test-time augmentation. A
    member's duplicate table is not used (it was weighed for that member alone):
    ``duplicates_from`` gives the ensemble its own, weighed for the ensemble."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two --saved_model")
    weights = [1.0] * len(members) if not weights else [float(w) for w in weights]
    if len(weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in weights) \
            or not math.isfinite(sum(weights)):
        raise ValueError(f"--weights: {len(members)} finite positive numbers with a finite "
                         f"sum, one per --saved_model (got {list(weights)})")
    with _writer(export_dir):
        return _ensemble(members, export_dir, weights, duplicates_from)


def _ensemble(members: Sequence[str], export_dir: str, weights: list[float],
              duplicates_from: str | None) -> dict:
    opened = [load(m) for m in members]
    first = opened[0]
    for e in opened:
        if e.fusion_model is not None:
            raise ValueError(f"{e.path}: an export with a fusion head cannot be an ensemble "
                             "member yet (its products are not scored image by image)")
    for e in opened[1:]:
        if not np.array_equal(e.taxonomy.category_ids, first.taxonomy.category_ids):
            raise ValueError(f"{e.path}: another taxonomy than {first.path}; an ensemble's "
                             "members must classify into the same categories")
    limits = [e.max_image_pixels for e in opened]
    model = models.ensemble_model([e.image_model for e in opened], list(weights))
    image_size = max(e.image_size for e in opened)
    table = None
    if duplicates_from:
        table = duplicate_table(duplicates_from, first.taxonomy, model, image_size)
    return write(export_dir, model, first.taxonomy, image_size=image_size,
                 top_k=max(e.top_k for e in opened), fallback_class=first.fallback_class,
                 max_image_pixels=None if None in limits else max(limits),
                 duplicate_table=table,
                 members=[{"saved_model": e.path, "weight": w, "image_size": e.image_size}
                          for e, w in zip(opened, weights)])


@dataclasses.dataclass
class Export:
    """An export opened for inference under a strategy (see `load`)."""

    path: str
    image_model: keras.Model
    image_size: int
    top_k: int
    fallback_class: int
    taxonomy: taxonomy_lib.Taxonomy
    max_image_pixels: int | None = None  # the training catalogue's frame size, if fixed
    duplicate_table: duplicates.Table | None = None  # with its blend weight
    fusion_model: keras.Model | None = None  # combines the image model's embeddings

    @property
    def category_ids(self) -> np.ndarray:
        return self.taxonomy.category_ids


def checksums(export_dir: str) -> dict[str, str]:
    """SHA-256 of every file of an export but its metadata, by path inside it."""
    root = export_dir.rstrip("/")
    out = {}
    for folder, _, names in tf.io.gfile.walk(root):
        for name in names:
            path = f"{folder.rstrip('/')}/{name}"
            rel = path[len(root) + 1:]
            if rel != METADATA:
                out[rel] = atomic.sha256(path)
    return dict(sorted(out.items()))


def verify(export_dir: str, meta: dict | None = None) -> None:
    """Checks every file of an export against the checksums it recorded, and its graph
    against the inference allow-list (`graph_check`: checksums stop accidents, not a
    crafted export that records its own).

    Raises:
      ValueError: naming the export and the first file missing, added or different
        (truncated, damaged or replaced), or the op its graph must not run.
    """
    meta = read_metadata(export_dir) if meta is None else meta
    recorded = meta.get("files")
    if recorded is None:  # exports of earlier versions recorded none
        logging.warning("%s records no checksums (an earlier version's export); its files "
                        "cannot be checked: export it again", export_dir)
    else:
        found = checksums(export_dir)
        for rel in sorted(set(recorded) | set(found)):
            if recorded.get(rel) != found.get(rel):
                what = ("is missing" if rel not in found else
                        "is not part of it" if rel not in recorded else
                        "differs from what the export recorded (truncated, damaged or "
                        "replaced)")
                raise ValueError(f"{export_dir}: {rel} {what}; export it again")
    graph = f"{export_dir.rstrip('/')}/saved_model.pb"
    if not tf.io.gfile.exists(graph):
        raise ValueError(f"{export_dir}: saved_model.pb is missing; export it again")
    with tf.io.gfile.GFile(graph, "rb") as f:
        problem = graph_check.problem(f.read())
    if problem:
        raise ValueError(f"{export_dir}: saved_model.pb is not an inference graph: {problem}, "
                         "file, process or network I/O that tfcdisc.export never writes; do "
                         "not use this export, export again from its run")


def read_metadata(export_dir: str) -> dict:
    """The export's tfcdisc.json (image size, top k, fallback, taxonomy), without loading
    the model: what can be checked before the model is loaded is checked first."""
    path = f"{export_dir.rstrip('/')}/{METADATA}"
    if not tf.io.gfile.exists(f"{export_dir.rstrip('/')}/{KERAS_MODEL}") or \
            not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{export_dir}: not a tfcdisc export (no {KERAS_MODEL}); give "
                                "the --export_dir of `python -m tfcdisc.export`")
    with tf.io.gfile.GFile(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{export_dir}: {METADATA} is damaged ({e}); export it "
                             "again") from None


def load(export_dir: str, strategy: tf.distribute.Strategy | None = None) -> Export:
    """The export's Keras image model (variables placed by ``strategy``) and metadata,
    once its files are checked against its checksums (`verify`)."""
    meta = read_metadata(export_dir)
    verify(export_dir, meta)
    path = f"{export_dir.rstrip('/')}/{KERAS_MODEL}"
    fusion_model = None
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "m.keras")
        tf.io.gfile.copy(path, local)
        with (strategy or product_eval.default_strategy()).scope():
            model = keras.saving.load_model(local, compile=False)
            if meta.get("fusion"):
                from tfcdisc import fusion  # noqa: F401 (registers the head's layers)
                tf.io.gfile.copy(f"{export_dir.rstrip('/')}/{FUSION}", local, overwrite=True)
                fusion_model = keras.saving.load_model(local, compile=False)
    table = None
    if meta.get("duplicates"):
        with tf.io.gfile.GFile(f"{export_dir.rstrip('/')}/{DUPLICATES}", "rb") as f:
            table = duplicates.Table.from_bytes(f.read())
    return Export(export_dir, model, meta["image_size"], meta["top_k"], meta["fallback_class"],
                  taxonomy_lib.Taxonomy.from_dict(meta["taxonomy"]),
                  meta.get("max_image_pixels"), table, fusion_model)


