"""The export format: a self-contained SavedModel plus the Keras image model, written
and read here (`exporting` makes one from a run or an ensemble).

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

What an export may add, all in the graph and in the assets: flip TTA or an ensemble
(inside the image model, `models.with_tta`, `models.ensemble_model`), a duplicate-image
table (``assets/duplicates.npz``, `tfcdisc.learn.duplicates`), the learned weights of a
product's images (a product phase's or a fusion head's ``slot_score``, inside the image
model, `tfcdisc.learn.fusion`).

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
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, folder_lock, paths
from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc.learn import duplicates, input_pipeline, models, product_predictor
from tfcdisc.serve import export_layout, graph_check

from tfcdisc.serve.export_layout import DUPLICATES, FUSION, KERAS_MODEL, METADATA  # noqa: F401


class ProductClassifier(tf.Module):
    """The exported module: image model + decoding + product combination + id table."""

    def __init__(self, image_model: keras.Model, taxonomy: taxonomy_lib.Taxonomy,
                 image_size: int, top_k: int, fallback_class: int,
                 duplicate_table: duplicates.Table | None = None):
        super().__init__()
        self.image_model = image_model
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
        out = product_predictor.product_scores(
            product_predictor.image_outputs(self.image_model, images, mask), mask, self.top_k,
            fallback_class=self.fallback_class,
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


def write(export_dir: str, image_model: keras.Model, taxonomy: taxonomy_lib.Taxonomy, *,
          image_size: int, top_k: int, fallback_class: int,
          max_image_pixels: int | None = None,
          duplicate_table: duplicates.Table | None = None, **extra) -> dict:
    """Writes an export of ``image_model`` (uint8 images in, ``label`` logits or
    log-probabilities out): the SavedModel, the Keras model and the metadata that
    `load` reads. ``extra`` goes into the metadata (how the model was made)."""
    top_k = min(top_k, taxonomy.num_classes)
    module = ProductClassifier(image_model, taxonomy, image_size, top_k, fallback_class,
                               duplicate_table)
    # How a product's images are combined: learned weights (a product phase's, a fusion
    # head's), or the mean.
    extra["product_pooling"] = "learned" if models.SLOT_SCORE in image_model.output else "mean"
    if duplicate_table is not None:
        extra["duplicates"] = {
            "unique_images": len(duplicate_table), "labelled_images": duplicate_table.images,
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
        with atomic.via_local(f"{target}/{KERAS_MODEL}") as local:
            image_model.save(local)
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
    with writer(final), _into_place(final) as target:
        yield target


def writer(export_dir: str, lease_minutes: float = folder_lock.DEFAULT_LEASE_MINUTES):
    """The export dir's lock (`folder_lock`): one writer at a time, taken before the work
    and held (re-entered) while the files are written. A linked export dir is its
    target's: both names take one lock."""
    final = paths.resolved(export_dir)
    return folder_lock.hold(final + ".tfcdisc-writer.lock", "tfcdisc.export", final,
                            lease_minutes)


@contextlib.contextmanager
def _into_place(final: str):
    final = paths.resolved(final)  # a link to the export dir stays a link to the new one
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
    if not isinstance(recorded, dict):  # an earlier version's export, or one edited to hide
        raise ValueError(                # a swapped file: never trusted unchecked
            f"{export_dir}: {METADATA} records no checksums of its files (an earlier "
            "version's export, or an edited one), so they cannot be checked; export it again "
            "from its run with this version")
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
        raise ValueError(f"{export_dir}: saved_model.pb is not an inference graph: {problem} "
                         "(tfcdisc.export never writes it); do not use this export, export "
                         "again from its run")


def read_metadata(export_dir: str) -> dict:
    """The export's tfcdisc.json (image size, top k, fallback, taxonomy), without loading
    the model: what can be checked before the model is loaded is checked first."""
    export_layout.check(export_dir)
    return atomic.load_json(f"{export_dir.rstrip('/')}/{METADATA}", None, "export it again",
                            name=f"{export_dir}: {METADATA}")


def load(export_dir: str, strategy: tf.distribute.Strategy | None = None) -> Export:
    """The export's Keras image model (variables placed by ``strategy``) and metadata,
    once its files are checked against its checksums (`verify`)."""
    meta = read_metadata(export_dir)
    verify(export_dir, meta)
    if FUSION in meta["files"]:
        raise ValueError(f"{export_dir}: an export with a fusion head of an earlier tfcdisc "
                         "(a class head over a product's embeddings), which this version no "
                         "longer runs; train the head again (python -m tfcdisc.train_fusion) "
                         "and export the run with it")
    path = f"{export_dir.rstrip('/')}/{KERAS_MODEL}"
    with (strategy or product_predictor.default_strategy()).scope():
        with atomic.local_copy(path) as local:
            model = models.load_model(local)
    table = None
    if meta.get("duplicates"):
        with tf.io.gfile.GFile(f"{export_dir.rstrip('/')}/{DUPLICATES}", "rb") as f:
            data = f.read()
        try:
            table = duplicates.Table.from_bytes(data)
        except (ValueError, KeyError, OSError) as e:  # pickled objects are never loaded
            raise ValueError(f"{export_dir}: {DUPLICATES} is not the table tfcdisc.export "
                             f"writes ({e}); export it again") from None
    return Export(export_dir, model, meta["image_size"], meta["top_k"], meta["fallback_class"],
                  taxonomy_lib.Taxonomy.from_dict(meta["taxonomy"]),
                  meta.get("max_image_pixels"), table)


