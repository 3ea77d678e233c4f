"""Batch inference over products, under any strategy: every product gets exactly one row.

Products stream from a BSON file (or a built TFDS split) through tf.data: JPEG headers
are checked in the reader, Python hands TensorFlow a whole batch of products at a time,
decoding runs in parallel map calls into static uint8 batches (the last one filled with
masked dummies), and the export's image model runs on them under the chosen strategy
(`product_eval.ProductPredictor`: the CPU, one or several GPUs, a TPU), the same path as
validation during training. Only one batch of predictions is held at a time; rows are
written as they come, to a temporary file that is renamed to the output only when every
product has its row, so an interrupted run leaves no partial submission.

A corrupt image is skipped and counted; a product left with no usable image still gets a
row (the export's fallback category, the most frequent in training) and is counted.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from tfcdisc import bsonfile, distribute, input_pipeline, jpeg, product_eval, serving


@dataclasses.dataclass
class PredictStats:
    """What prediction saw; printed at the end and returned."""

    products: int = 0
    images: int = 0
    corrupt_images: int = 0
    products_without_images: int = 0
    examples: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    strategy: str = ""
    replicas: int = 1

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["products_per_second"] = round(self.products / self.seconds, 1) if self.seconds else 0
        return d


def bson_products(path: str, stats: PredictStats, labeled: bool | None = None,
                  chunk: int = 256) -> tf.data.Dataset:
    """Padded products of a BSON file (``images``, ``product_id``, ``category_id``), bad
    JPEGs blanked (and counted) before they reach TensorFlow.

    Python hands products over ``chunk`` at a time (one generator call per chunk, not per
    product: far less GIL traffic beside the model's own threads).
    """
    n = input_pipeline.MAX_IMAGES

    def gen():
        ids, images, labels = [], [], []
        for p in bsonfile.iter_products(path, labeled=labeled):
            q = _screen(p.product_id, p.images, p.category_id, stats, f"{path}: _id")
            ids.append(q["product_id"])
            images.append(q["images"] + [b""] * (n - len(q["images"])))
            labels.append(q["category_id"])
            if len(ids) == chunk:
                yield np.array(ids, np.int64), np.array(images, object), np.array(labels, np.int64)
                ids, images, labels = [], [], []
        if ids:
            yield np.array(ids, np.int64), np.array(images, object), np.array(labels, np.int64)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, n], tf.string),
        tf.TensorSpec([None], tf.int64)))
    return ds.unbatch().map(lambda pid, images, cid: {"images": images, "product_id": pid,
                                                      "category_id": cid})


def _screen(product_id: int, images: Sequence[bytes], category_id, stats: PredictStats,
            where: str) -> dict:
    good = []
    for k, data in enumerate(images[:input_pipeline.MAX_IMAGES]):
        try:
            jpeg.read_header(data)
            good.append(data)
        except jpeg.JpegError as e:
            stats.corrupt_images += 1
            if len(stats.examples) < 20:
                stats.examples.append(f"{where} {product_id} image {k}: {e}")
    stats.images += len(good)
    if not good:
        stats.products_without_images += 1
    return {"product_id": product_id, "images": good,
            "category_id": -1 if category_id is None else category_id}


def open_products(*, bson: str | None, data_dir: str | None, split: str,
                  stats: PredictStats, labeled: bool | None = False
                  ) -> tuple[Callable[[], tf.data.Dataset], int]:
    """A function making the products to score (from a BSON file or a built TFDS split,
    with ``category_id`` where known), and their number.

    For a BSON file the number comes from its offset index (built once, reused after):
    batches are planned exactly, the progress bar gets an ETA, and a corrupt file fails
    before any prediction.
    """
    if bool(bson) == bool(data_dir):
        raise ValueError("give exactly one of --bson and --data_dir")
    if bson:
        from tfcdisc import index as index_lib
        total = len(index_lib.load_or_build(bson))
        return lambda: bson_products(bson, stats, labeled), total
    builder = input_pipeline.load_builder(data_dir)
    total = builder.info.splits[split].num_examples
    ids = tf.constant([int(c) for c in builder.info.features["label"].names], tf.int64)

    def products():
        return input_pipeline.split_products(builder, split, ids)

    stats.images = int((builder.info.metadata or {}).get("build_stats", {}).get(
        "splits", {}).get(split, {}).get("images", 0))
    return products, total


def run_predictions(export: serving.Export, products: Callable[[], tf.data.Dataset],
                    total: int | None, strategy: tf.distribute.Strategy, stats: PredictStats,
                    batch_size: int = 256, progress: bool = True
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one batch of predictions (numpy, category ids) at a time, with a progress bar."""
    from tqdm import tqdm
    predictor = product_eval.ProductPredictor(export.image_model, export.top_k, strategy,
                                              export.fallback_class)
    batches = product_eval.distribute_products(strategy, products, batch_size,
                                               export.image_size, total)
    ids = export.category_ids
    stats.strategy = type(strategy).__name__
    stats.replicas = strategy.num_replicas_in_sync
    start = time.perf_counter()
    with tqdm(total=total, unit=" products", disable=not progress, file=sys.stderr,
              mininterval=1.0, smoothing=0.1) as bar:
        for out in predictor.batches(batches):
            top = out["top_k_classes"]
            image_top1 = out["image_top1"]
            result = {
                "product_id": out["product_id"],
                "category_id": ids[top[:, 0]],
                "probability": out["top_k_probabilities"][:, 0],
                "top_k_category_id": ids[top],
                "top_k_probability": out["top_k_probabilities"],
                "image_category_id": np.where(image_top1 >= 0, ids[np.maximum(image_top1, 0)],
                                              -1),
                "label_category_id": out["category_id"],
                "num_images": out["mask"].sum(axis=1).astype(np.int32),
            }
            stats.products += len(result["product_id"])
            bar.update(len(result["product_id"]))
            yield result
    stats.seconds = time.perf_counter() - start


def open_export(saved_model: str | serving.Export, strategy: str | tf.distribute.Strategy,
                tpu: str | None = None) -> tuple[serving.Export, tf.distribute.Strategy]:
    """The export opened under the strategy (a name from `config.INFERENCE_STRATEGIES`,
    or a strategy); an already opened export is reused as it is."""
    if isinstance(strategy, str):
        from tfcdisc.config import INFERENCE_STRATEGIES
        if strategy not in INFERENCE_STRATEGIES:
            raise ValueError(f"--strategy={strategy}: choose from "
                             f"{', '.join(INFERENCE_STRATEGIES)}")
        strategy = distribute.get_strategy(strategy, tpu)
    if isinstance(saved_model, serving.Export):
        return saved_model, strategy
    return serving.load(saved_model, strategy), strategy


def predict(saved_model: str | serving.Export, output: str, *, bson: str | None = None,
            data_dir: str | None = None, split: str = "test", batch_size: int = 256,
            top_k_output: str | None = None, progress: bool = True,
            strategy: str | tf.distribute.Strategy = "default", tpu: str | None = None
            ) -> PredictStats:
    """Writes ``output`` (``_id,category_id``, one row per product, file order) atomically.

    ``saved_model`` is an export folder, or a `serving.Export` to reuse across calls.
    ``top_k_output`` (.parquet or .csv) adds the top-k category ids and probabilities per
    product, for ensembling.
    """
    stats = PredictStats()
    products, total = open_products(bson=bson, data_dir=data_dir, split=split, stats=stats)
    export, strategy = open_export(saved_model, strategy, tpu)
    tmp = output + ".tmp"
    top_rows = [] if top_k_output else None
    try:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write("_id,category_id\n")
            for out in run_predictions(export, products, total, strategy, stats, batch_size,
                                       progress):
                f.write("".join(f"{i},{c}\n" for i, c in zip(out["product_id"].tolist(),
                                                             out["category_id"].tolist())))
                if top_rows is not None:
                    top_rows.append(out)
        if top_rows is not None:
            write_top_k(top_rows, top_k_output)
        tf.io.gfile.rename(tmp, output, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
    return stats


def write_top_k(batches: list[dict[str, np.ndarray]], path: str) -> None:
    import pandas as pd
    ids = np.concatenate([b["top_k_category_id"] for b in batches])
    probs = np.concatenate([b["top_k_probability"] for b in batches])
    frame = pd.DataFrame({"_id": np.concatenate([b["product_id"] for b in batches])})
    for j in range(ids.shape[1]):
        frame[f"category_id_{j + 1}"] = ids[:, j]
        frame[f"probability_{j + 1}"] = probs[:, j]
    buf = io.BytesIO()
    if path.endswith(".parquet"):
        frame.to_parquet(buf, index=False)
    else:
        buf.write(frame.to_csv(index=False).encode())
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buf.getvalue())
