"""Batch inference over products, under any strategy: every product gets exactly one row.

Products stream from a BSON file (through its offset index) or a built TFDS split
through tf.data: image headers are checked in the reader (`tfcdisc.catalogue.screen`), Python hands
TensorFlow a whole batch of products at a time,
decoding runs in parallel map calls into static uint8 batches (the last one filled with
masked dummies), and the export's image model runs on them under the chosen strategy
(`product_predictor.ProductPredictor`: the CPU, one or several GPUs, a TPU), the same path as
validation during training. Only one batch of predictions is held at a time; rows are
written as they come, to a temporary file that is renamed to the output only when every
product has its row, so an interrupted run leaves no partial submission.

A corrupt image is skipped and counted with its product's _id; a product left with no
usable image still gets a row (the export's fallback category, the most frequent in
training) and is counted. A document that cannot be read at all (``errors="skip"``) has
no _id to give a row to: it is listed as lost, and `predict` refuses to write a
submission with rows missing unless ``allow_missing``.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, paths, problems, screen
from tfcdisc import settings
from tfcdisc.learn import distribute, input_pipeline, product_predictor
from tfcdisc.prepare import metadata
from tfcdisc.serve import export_format


@dataclasses.dataclass
class PredictStats:
    """What prediction saw and everything it skipped; printed at the end and returned.

    ``skipped_images`` lists (product _id, image position, reason) and ``lost`` lists
    (byte offset, problem) of documents that could not be read, so no product has a row
    (the first `problems.LISTED` of each; the counts are exact).
    """

    products: int = 0
    images: int = 0
    corrupt_images: int = 0
    extra_images: int = 0  # usable images past the export's 4 slots: read, not scored
    products_without_images: int = 0
    bad_documents: int = 0
    skipped_bytes: int = 0
    skipped_images: list = dataclasses.field(default_factory=list)
    lost: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    strategy: str = ""
    replicas: int = 1

    @property
    def products_lost(self) -> bool:
        return bool(self.bad_documents or self.skipped_bytes)

    def as_dict(self, listed: int | None = 20) -> dict:
        d = dataclasses.asdict(self)
        d["skipped_images"] = d["skipped_images"][:listed]
        d["lost"] = d["lost"][:listed]
        d["products_per_second"] = round(self.products / self.seconds, 1) if self.seconds else 0
        return d


def screened(products: Iterator, stats: PredictStats, max_pixels: int | None = None,
             chunk: int = 256) -> Iterator[list[tuple[object, list[bytes]]]]:
    """Products ``chunk`` at a time, each with its images padded to the export's slots
    (``b""``): an image whose header fails the screen (`tfcdisc.catalogue.screen`) is
    blanked, counted and listed with its product's _id. Shared by the local and the Beam
    reader. Headers only: an image with garbage scan data fails at the pipeline's own decode
    (`input_pipeline.decode_failsafe`), masked there and counted by `run_predictions`."""
    n = input_pipeline.MAX_IMAGES
    for batch in screen.screen_products(products, chunk, max_pixels=max_pixels, decode=False):
        out = []
        for p, verdicts in batch:
            if sum(v is None for v in verdicts) > n:
                # More images than slots (never in the real catalogue, 1-4 a product): the
                # first n that decode fill the slots, not the first n, which may all be bad.
                verdicts = screen.screen(p.images, max_pixels=max_pixels)
            good = []
            for k, (data, problem) in enumerate(zip(p.images, verdicts)):
                if problem is None:
                    if len(good) < n:
                        good.append(data)
                    else:
                        stats.extra_images += 1
                    continue
                stats.corrupt_images += 1
                problems.note(stats.skipped_images, (p.product_id, k, str(problem)))
            stats.images += len(good)
            stats.products_without_images += not good
            out.append((p, good + [b""] * (n - len(good))))
        yield out


def bson_products(source, stats: PredictStats, max_pixels: int | None = None,
                  chunk: int = 256) -> tf.data.Dataset:
    """Padded products (``images``, ``product_id``, ``category_id``) of a BSON file (a path,
    or its `tfcdisc.catalogue.index.OffsetIndex`): exactly the index's products, in file order, each
    image screened (`screened`) before TensorFlow sees it.

    Python hands products over ``chunk`` at a time (one generator call per chunk, not per
    product: far less GIL traffic beside the model's own threads).
    """
    n = input_pipeline.MAX_IMAGES
    if isinstance(source, str):
        from tfcdisc.catalogue import index as index_lib
        source = index_lib.load_or_build(source)

    def gen():
        for batch in screened(source.iter_products(), stats, max_pixels, chunk):
            yield (np.array([p.product_id for p, _ in batch], np.int64),
                   np.array([images for _, images in batch], object),
                   np.array([-1 if p.category_id is None else p.category_id
                             for p, _ in batch], np.int64))

    ds = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, n], tf.string),
        tf.TensorSpec([None], tf.int64)))
    return ds.unbatch().map(lambda pid, images, cid: {"images": images, "product_id": pid,
                                                      "category_id": cid})


def open_products(*, bson: str | None, data_dir: str | None, split: str,
                  stats: PredictStats, errors: str = "strict",
                  max_pixels: int | None = None, index=None,
                  dataset_config: str | None = None
                  ) -> tuple[Callable[[], tf.data.Dataset], int]:
    """A function making the products to score (from a BSON file or a built TFDS split,
    with ``category_id`` where known: -1 otherwise), and their number.

    A BSON file is read through its offset index (built once, reused after): batches are
    planned exactly, the progress bar gets an ETA, and a corrupt file fails before any
    prediction, or, with ``errors="skip"``, what cannot be read is counted in ``stats``.
    """
    if bool(bson) == bool(data_dir):
        raise ValueError("give exactly one of --bson and --data_dir")
    if bson:
        if index is None:  # a caller that checked the file first passes its index
            from tfcdisc.catalogue import index as index_lib
            index = index_lib.load_or_build(bson, errors=errors)
        lost_from(index, stats)
        refuse_empty(bson, len(index), stats)
        return lambda: bson_products(index, stats, max_pixels), len(index)
    builder = input_pipeline.load_builder(data_dir, dataset_config)
    if split not in builder.info.splits:
        raise ValueError(f"{data_dir}: no split {split!r}; it has "
                         f"{', '.join(sorted(builder.info.splits))} (--split)")
    total = builder.info.splits[split].num_examples
    refuse_empty(f"{data_dir} (split {split})", total, stats)

    def products():
        return input_pipeline.split_products(builder, split, category_ids=True)

    stats.images = metadata.read(builder, data_dir).images.get(split, 0)
    return products, total


_DEFAULT = settings.PredictSettings  # one default per setting (its flag's)


def _used_table(export: export_format.Export):
    table = export.duplicate_table
    return table if table is not None and table.weight > 0 else None


def predictor_for(export: export_format.Export, strategy: tf.distribute.Strategy
                  ) -> product_predictor.ProductPredictor:
    """The export's scoring (its model and duplicate table's weight), compiled once:
    what local predict, evaluate and each Beam worker run."""
    table = _used_table(export)
    return product_predictor.ProductPredictor(export.image_model, export.top_k, strategy,
                                              export.fallback_class,
                                              duplicate_weight=table.weight if table else 0.0)


def run_predictions(export: export_format.Export, products: Callable[[], tf.data.Dataset],
                    total: int | None, strategy: tf.distribute.Strategy, stats: PredictStats,
                    batch_size: int = 256, progress: bool = True,
                    predictor: product_predictor.ProductPredictor | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one batch of predictions (numpy, category ids) at a time, with a progress bar
    (``predictor``: one `predictor_for` made earlier, reused)."""
    from tqdm import tqdm
    table = _used_table(export)
    predictor = predictor or predictor_for(export, strategy)
    batches = product_predictor.distribute_products(strategy, products, batch_size,
                                               export.image_size, total, table)
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
                "undecodable": out["undecodable"],
                "duplicate_hits": out.get("duplicate_hits",
                                          np.zeros(len(out["product_id"]), np.int32)),
            }
            count_undecodable(out["product_id"], out["undecodable"],
                              result["num_images"], stats)
            stats.products += len(result["product_id"])
            bar.update(len(result["product_id"]))
            yield result
    stats.seconds = time.perf_counter() - start


def count_undecodable(product_ids: np.ndarray, undecodable: np.ndarray, decoded: np.ndarray,
                      stats: PredictStats) -> None:
    """Images TensorFlow could not decode (``undecodable`` [n, slots] > 0: masked by the
    pipeline) counted and listed with their product's _id; a product left with none
    (``decoded`` [n] images) still has its row, and is counted. Local and Beam alike."""
    rows, slots = np.nonzero(undecodable)
    for row, slot in zip(rows.tolist(), slots.tolist()):
        problems.note(stats.skipped_images, (int(product_ids[row]), slot,
                                             "JPEG that cannot be decoded (TensorFlow's "
                                             f"decoder failed on the image in slot {slot})"))
    stats.corrupt_images += len(rows)
    stats.images -= len(rows)
    stats.products_without_images += int(np.sum((decoded == 0)
                                                & (undecodable.sum(axis=1) > 0)))


def open_export(saved_model: str | export_format.Export, strategy: str | tf.distribute.Strategy,
                tpu: str | None = None) -> tuple[export_format.Export, tf.distribute.Strategy]:
    """The export opened under the strategy (a name from `settings.INFERENCE_STRATEGIES`,
    or a strategy); an already opened export is reused as it is."""
    if isinstance(strategy, str):
        from tfcdisc.settings import INFERENCE_STRATEGIES
        if strategy not in INFERENCE_STRATEGIES:
            raise ValueError(f"--strategy={strategy}: choose from "
                             f"{', '.join(INFERENCE_STRATEGIES)}")
        strategy = distribute.get_strategy(strategy, tpu)
    if isinstance(saved_model, export_format.Export):
        return saved_model, strategy
    return export_format.load(saved_model, strategy), strategy


def max_image_pixels(saved_model: str | export_format.Export) -> int | None:
    """The largest frame an image may declare: the training catalogue's (from the export's
    metadata, read without loading its model)."""
    if isinstance(saved_model, export_format.Export):
        return saved_model.max_image_pixels
    return export_format.read_metadata(saved_model).get("max_image_pixels")


@dataclasses.dataclass
class Scoring:
    """An export opened for scoring, with the products to score: the one set-up that
    predict, evaluate, show and Beam's workers share (`open_scoring`)."""

    export: export_format.Export
    strategy: tf.distribute.Strategy
    stats: PredictStats
    products: Callable[[], tf.data.Dataset] | None = None  # None: the caller brings its own
    total: int | None = None
    _predictor: product_predictor.ProductPredictor | None = None

    def predictions(self, batch_size: int = _DEFAULT.batch_size, progress: bool = True,
                    products: Callable[[], tf.data.Dataset] | None = None,
                    total: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """`run_predictions` over ``products`` (default: the opened ones), with the
        export's scoring compiled once for every call."""
        if self._predictor is None:
            self._predictor = predictor_for(self.export, self.strategy)
        if products is None:
            products, total = self.products, self.total
        return run_predictions(self.export, products, total, self.strategy, self.stats,
                               batch_size, progress, self._predictor)


def open_scoring(saved_model: str | export_format.Export, *,
                 strategy: str | tf.distribute.Strategy = _DEFAULT.strategy,
                 tpu: str | None = None, bson: str | None = None,
                 data_dir: str | None = None, split: str = _DEFAULT.split,
                 errors: str = _DEFAULT.errors, dataset_config: str | None = None,
                 index=None, label_map: dict[int, int] | None = None,
                 allow_missing: bool = True, with_products: bool = True) -> Scoring:
    """The export (a folder, or one opened before) under the strategy (a name of
    `settings.INFERENCE_STRATEGIES`, or a strategy), with the products of ``bson`` or
    ``data_dir`` (`open_products`; ``with_products=False``: none, the caller brings its
    own to `Scoring.predictions`), their ``category_id`` from
    ``label_map`` where given. What can be refused without the model (an empty or
    unreadable file, products that could get no row unless ``allow_missing``) is refused
    before the model loads."""
    stats = PredictStats()
    products = total = None
    if with_products:
        products, total = open_products(bson=bson, data_dir=data_dir, split=split,
                                        stats=stats, errors=errors,
                                        max_pixels=max_image_pixels(saved_model), index=index,
                                        dataset_config=dataset_config)
        refuse_missing(stats, bson, allow_missing)
        if label_map is not None:
            products = with_labels(products, label_map)
    export, strategy = open_export(saved_model, strategy, tpu)
    return Scoring(export, strategy, stats, products, total)


def with_labels(products: Callable[[], tf.data.Dataset], labels: dict[int, int]
                ) -> Callable[[], tf.data.Dataset]:
    """Products with ``category_id`` from the labels; -2 marks an id the file lacks."""
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(labels), tf.int64), tf.constant(list(labels.values()), tf.int64)),
        default_value=-2)
    return lambda: products().map(lambda p: {**p, "category_id": table.lookup(p["product_id"])})


def predict(saved_model: str | export_format.Export, output: str, *, bson: str | None = None,
            data_dir: str | None = None, split: str = _DEFAULT.split,
            batch_size: int = _DEFAULT.batch_size, top_k_output: str | None = None,
            progress: bool = True, strategy: str | tf.distribute.Strategy = _DEFAULT.strategy,
            tpu: str | None = None, errors: str = _DEFAULT.errors,
            allow_missing: bool = _DEFAULT.allow_missing,
            dataset_config: str | None = None) -> PredictStats:
    """Writes ``output`` (``_id,category_id``, one row per product, file order) atomically.

    ``saved_model`` is an export folder, or a `export_format.Export` to reuse across calls.
    ``top_k_output`` (.parquet or .csv) adds the top-k category ids and probabilities per
    product, for ensembling. With ``errors="skip"`` unreadable documents of ``bson`` are
    skipped and counted; since their products can have no row, that is refused before
    any prediction unless ``allow_missing``.
    """
    paths.check_output(output)
    if top_k_output:
        paths.check_output(top_k_output, "--top_k_output")
    scoring = open_scoring(saved_model, strategy=strategy, tpu=tpu, bson=bson,
                           data_dir=data_dir, split=split, errors=errors,
                           dataset_config=dataset_config, allow_missing=allow_missing)
    top_rows = [] if top_k_output else None
    # Rows go to a local temporary file, copied over the output only when complete: a run
    # killed at any moment leaves neither a partial submission nor a stray file beside it.
    with atomic.via_local(output) as local, open(local, "w") as f:
        f.write("_id,category_id\n")
        for out in scoring.predictions(batch_size, progress):
            f.write("".join(f"{i},{c}\n" for i, c in zip(out["product_id"].tolist(),
                                                         out["category_id"].tolist())))
            if top_rows is not None:
                top_rows.append(out)
        if top_rows is not None:
            write_top_k(top_rows, top_k_output)
    return scoring.stats


class MissingProductsError(ValueError):
    """Some products cannot get a row; predict refuses unless told to allow it."""


def refuse_missing(stats: PredictStats, bson: str | None, allow_missing: bool) -> None:
    """Raises `MissingProductsError` if unreadable documents leave products without a row,
    unless ``allow_missing``: before any prediction."""
    if stats.products_lost and not allow_missing:
        offset, problem = stats.lost[0]
        raise MissingProductsError(
            f"{bson}: {stats.bad_documents} document(s) and {stats.skipped_bytes} byte(s) "
            f"cannot be read (first at byte offset {offset}: {problem}), so their products "
            "would have no row; fix the file, or rerun with --allow_missing to write the "
            "submission without them")


def refuse_empty(source: str, products: int, stats: PredictStats) -> None:
    """A source without a single product (a 0-byte file, a failed copy) gave a
    header-only submission, exit 0; refused unless documents were lost reading it (then
    `refuse_missing` says so)."""
    if not products and not stats.products_lost:
        raise ValueError(f"{source} holds no products; check the file (a failed or "
                         "unfinished copy?) or the path")


def lost_from(index, stats: PredictStats) -> None:
    """Copies what reading the file skipped (from its offset index) into ``stats``."""
    stats.bad_documents, stats.skipped_bytes = index.bad_documents, index.skipped_bytes
    stats.lost = problems.first(index.problems)


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
    atomic.write(path, buf.getvalue())
