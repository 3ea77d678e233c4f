"""Batch prediction with an exported SavedModel: every product gets exactly one row.

    python -m tfcdisc.predict --saved_model=EXPORT --bson=test.bson --output=submission.csv
    python -m tfcdisc.predict --saved_model=EXPORT --data_dir=DATA --split=test \
        --output=submission.csv [--top_k_output=top5.parquet]

Products stream from the BSON (or the TFDS split) through tf.data: JPEG headers are
checked in the reader, decoding runs in parallel map calls, large batches go to the
model's ``predict_decoded`` signature while the next ones are decoded. Only one batch of
predictions is held at a time; rows are written as they come, to a temporary file that is
renamed to ``--output`` only when every product has its row, so an interrupted run leaves
no partial submission.

A corrupt image is skipped and counted; a product left with no usable image still gets a
row (the export's fallback category, the most frequent in training) and is counted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from tfcdisc import bsonfile, input_pipeline, jpeg


@dataclasses.dataclass
class PredictStats:
    """What prediction saw; printed at the end and returned."""

    products: int = 0
    images: int = 0
    corrupt_images: int = 0
    products_without_images: int = 0
    examples: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["products_per_second"] = round(self.products / self.seconds, 1) if self.seconds else 0
        return d


def load_model(saved_model: str):
    """The SavedModel and its metadata (image size, top k, taxonomy)."""
    model = tf.saved_model.load(saved_model)
    meta = {k: v.numpy() for k, v in model.signatures["metadata"]().items()}
    return model, {"image_size": int(meta["image_size"]), "top_k": int(meta["top_k"]),
                   "taxonomy": json.loads(meta["taxonomy_json"].decode("utf-8")),
                   "fallback_category_id": int(meta["fallback_category_id"])}


def bson_products(path: str, stats: PredictStats, labeled: bool | None = None
                  ) -> Iterator[dict]:
    """Products of a BSON file, bad JPEGs blanked (and counted) before they reach TF."""
    for p in bsonfile.iter_products(path, labeled=labeled):
        yield _screen(p.product_id, p.images, p.category_id, stats, f"{path}: _id")


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


def tfds_products(data_dir: str, split: str, stats: PredictStats) -> Iterator[dict]:
    """Products of a built TFDS split, as stored (labels are class indices there)."""
    import tensorflow_datasets as tfds
    builder = input_pipeline.load_builder(data_dir)
    names = builder.info.features["label"].names
    ds = builder.as_dataset(split=split, decoders={"images": tfds.decode.SkipDecoding()})
    for ex in ds.as_numpy_iterator():
        label = int(ex["label"])
        yield _screen(int(ex["product_id"]), list(ex["images"]),
                      int(names[label]) if label >= 0 else None, stats,
                      f"{data_dir}[{split}]: _id")


def product_batches(products: Iterator[dict], image_size: int, batch_size: int
                    ) -> tf.data.Dataset:
    """(product_id, images uint8 [B, 4, S, S, 3], mask [B, 4], category_id) batches.

    Python hands products to TensorFlow a whole batch at a time (one generator call per
    batch, not per product: far less GIL traffic beside the model's own threads), and
    batches are decoded in parallel while the model runs; the last batch is smaller
    (predict_decoded takes any size).
    """
    n = input_pipeline.MAX_IMAGES

    def gen():
        ids, images, labels = [], [], []
        for p in products:
            ids.append(p["product_id"])
            images.append(list(p["images"]) + [b""] * (n - len(p["images"])))
            labels.append(p["category_id"])
            if len(ids) == batch_size:
                yield np.array(ids, np.int64), np.array(images, object), np.array(labels, np.int64)
                ids, images, labels = [], [], []
        if ids:
            yield np.array(ids, np.int64), np.array(images, object), np.array(labels, np.int64)

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, n], tf.string),
        tf.TensorSpec([None], tf.int64)))

    def decode(pid, images, category_id):
        return (pid, input_pipeline.decode_products(images, image_size, tf.uint8),
                input_pipeline.padding_mask(images), category_id)

    opts = tf.data.Options()
    opts.deterministic = True  # rows in file order
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).with_options(opts).prefetch(2)


def run_predictions(model, batches: tf.data.Dataset, stats: PredictStats, total: int | None,
                    progress: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Yields one batch of predictions (numpy) at a time, with a progress bar."""
    from tqdm import tqdm
    predict = model.signatures["predict_decoded"]
    start = time.perf_counter()
    with tqdm(total=total, unit=" products", disable=not progress, file=sys.stderr,
              mininterval=1.0, smoothing=0.1) as bar:
        for pid, images, mask, category_id in batches:
            out = {k: v.numpy() for k, v in predict(images=images, mask=mask).items()}
            out["product_id"] = pid.numpy()
            out["label_category_id"] = category_id.numpy()
            out["num_images"] = mask.numpy().sum(axis=1).astype(np.int32)
            stats.products += len(out["product_id"])
            bar.update(len(out["product_id"]))
            yield out
    stats.seconds = time.perf_counter() - start


def open_products(*, bson: str | None, data_dir: str | None, split: str,
                  stats: PredictStats, labeled: bool | None = False
                  ) -> tuple[Iterator[dict], int | None]:
    """The products to score, from a BSON file or a built TFDS split, and their number.

    For a BSON file the number comes from its offset index (built once, reused after):
    the progress bar gets an ETA, and a corrupt file fails before any prediction.
    """
    if bool(bson) == bool(data_dir):
        raise ValueError("give exactly one of --bson and --data_dir")
    if bson:
        from tfcdisc import index as index_lib
        return bson_products(bson, stats, labeled), len(index_lib.load_or_build(bson))
    builder = input_pipeline.load_builder(data_dir)
    return tfds_products(data_dir, split, stats), builder.info.splits[split].num_examples


def predict(saved_model, output: str, *, bson: str | None = None,
            data_dir: str | None = None, split: str = "test", batch_size: int = 256,
            top_k_output: str | None = None, progress: bool = True) -> PredictStats:
    """Writes ``output`` (``_id,category_id``, one row per product, file order) atomically.

    ``saved_model`` is a path, or a `load_model` result to reuse across calls.
    ``top_k_output`` (.parquet or .csv) adds the top-k category ids and probabilities per
    product, for ensembling.
    """
    stats = PredictStats()
    products, total = open_products(bson=bson, data_dir=data_dir, split=split, stats=stats)
    model, meta = load_model(saved_model) if isinstance(saved_model, str) else saved_model
    batches = product_batches(products, meta["image_size"], batch_size)
    tmp = output + ".tmp"
    top_rows = [] if top_k_output else None
    try:
        with tf.io.gfile.GFile(tmp, "w") as f:
            f.write("_id,category_id\n")
            for out in run_predictions(model, batches, stats, total, progress):
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


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    try:
        stats = predict(f.saved_model, f.output, bson=f.bson, data_dir=f.data_dir,
                        split=f.split, batch_size=f.batch_size, top_k_output=f.top_k_output)
    except (ValueError, FileNotFoundError, bsonfile.BsonFormatError) as e:
        print(f"predict: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"output": f.output, **stats.as_dict()}, indent=2))


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("saved_model", None, "Folder written by tfcdisc.export.", required=True)
    flags.DEFINE_string("output", "submission.csv", "The submission CSV (_id,category_id).")
    flags.DEFINE_string("bson", None, "A test.bson-style file (local or gs://).")
    flags.DEFINE_string("data_dir", None, "A built TFDS cdiscount dataset (instead of --bson).")
    flags.DEFINE_string("split", "test", "The TFDS split, with --data_dir.")
    flags.DEFINE_integer("batch_size", 256, "Products per model call.", lower_bound=1)
    flags.DEFINE_string("top_k_output", None, "Also write top-k ids and probabilities per "
                        "product (.parquet or .csv), for ensembling.")


def run() -> None:
    from tfcdisc import cli
    cli.run(_define_flags, main)


if __name__ == "__main__":
    run()
