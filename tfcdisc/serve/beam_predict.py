"""Batch prediction on Apache Beam: RunInference over byte ranges of a BSON file.

    python -m tfcdisc.predict --saved_model=EXPORT --bson=gs://B/test.bson \
        --output=gs://B/submission.csv --beam_pipeline_options="runner=DataflowRunner,..."

For a model or an ensemble too large for one machine's hours. The file's offset index
is built as Beam work (`tfcdisc.catalogue.beam_index`) or reused; the products are cut into
contiguous ranges of about ``range_bytes``; each Beam worker reads its range, screens
the image headers as the local reader does (`tfcdisc.serve.inference.screened`), and Beam's
RunInference scores batches of products exactly as a local predict does: the same
loader, model and scoring (`ExportHandler`), one source of truth per export (the
SavedModel's graph is for serving systems; workers install tfcdisc).
Static shapes are not needed here: Beam workers run on CPUs or GPUs, not TPUs.
Each range's rows are written to a part file in file order; the launcher joins the
parts in range order into the same ``submission.csv`` as the local path (header, one row
per product, file order), written atomically once every product has its row.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult
import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, beam_index, bsonfile, paths, problems
from tfcdisc.serve import inference, export_format
from tfcdisc.learn import input_pipeline, product_predictor
from tfcdisc.catalogue import index as index_lib

RANGE_BYTES = 64 << 20  # one Beam element: about 8,000 real products


def pipeline_options(flag_value: str):
    """`PipelineOptions` from the comma-separated form `tfds build` takes too
    (``runner=DirectRunner,direct_num_workers=2``)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    return PipelineOptions([f"--{kv.strip()}" for kv in flag_value.split(",") if kv.strip()])


def predict(saved_model: str, output: str, *, bson: str, beam_options,
            batch_size: int = 256, errors: str = "strict", allow_missing: bool = False,
            range_bytes: int = RANGE_BYTES) -> inference.PredictStats:
    """Writes ``output`` as `tfcdisc.serve.inference.predict` does, running on Beam."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    paths.check_output(output)
    stats = inference.PredictStats()
    meta = export_format.read_metadata(saved_model)  # also checks it is an export
    export_format.verify(saved_model, meta)  # refused here, before any Beam work, if damaged
    max_pixels = meta.get("max_image_pixels")
    work = f"{output}.parts"
    if tf.io.gfile.exists(work):
        tf.io.gfile.rmtree(work)
    tf.io.gfile.makedirs(work)
    try:
        index = index_lib.load_stored(bson, errors=errors)
        if index is None:
            index = beam_index.index_files(
                [bson], [f"{work}/index.idx.npz"], errors=errors, beam_options=beam_options,
                range_bytes=beam_index.RANGE_BYTES)[bson]
        inference.lost_from(index, stats)
        inference.refuse_empty(bson, len(index), stats)
        inference.refuse_missing(stats, bson, allow_missing)
        size = int(index.offsets[-1] + index.lengths[-1] - index.offsets[0]) if len(index) else 0
        n = max(1, min(len(index), math.ceil(size / range_bytes)))
        shards = [index.shard(k, n) for k in range(n)]
        ranges = [(k, index.offsets[r.lo:r.hi], index.lengths[r.lo:r.hi],
                   index.product_ids[r.lo:r.hi], index.category_ids[r.lo:r.hi])
                  for k, r in enumerate(shards) if r.num_products]
        start = time.perf_counter()
        handler = KeyedModelHandler(ExportHandler(saved_model, batch_size))
        with beam.Pipeline(options=beam_options) as pipeline:
            _ = (pipeline
                 | "Ranges" >> beam.Create(ranges) | "Spread" >> beam.Reshuffle()
                 | "Read" >> beam.FlatMap(_read_range, bson, index.labeled, max_pixels, work)
                 | "Predict" >> RunInference(handler)
                 | "ByRange" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[0][2],
                                                                *kv[1].inference)))
                 | "Group" >> beam.GroupByKey()
                 | "Write" >> beam.Map(_write_part, work))
        stats.seconds = time.perf_counter() - start
        stats.strategy = "beam:" + (beam_options.get_all_options().get("runner") or
                                    "DirectRunner")
        _join(ranges, work, output, stats)
    finally:
        if tf.io.gfile.exists(work):
            tf.io.gfile.rmtree(work)
    return stats


class ExportHandler(ModelHandler):
    """Beam ModelHandler for a tfcdisc export: products (4 JPEG slots, ``b""`` padding)
    in, category ids out, through the same loader (`export_format.load`: checksums, safe-mode
    Keras model, graph check) and the same scoring (`inference.run_predictions`) as a
    local predict, so both paths give the same rows from the same files."""

    def __init__(self, saved_model: str, batch_size: int):
        super().__init__()
        self._saved_model, self._batch_size = saved_model, batch_size

    def load_model(self) -> inference.Scoring:
        return inference.open_scoring(self._saved_model, with_products=False,
                                      strategy=product_predictor.default_strategy())

    def run_inference(self, batch: Sequence[list[bytes]], model: Any,
                      inference_args=None) -> Iterable[PredictionResult]:
        n = len(batch)
        products = {"images": np.array(list(batch), object), "product_id": np.arange(n),
                    "category_id": np.full(n, -1, np.int64)}
        rows = list(model.predictions(
            self._batch_size, progress=False, total=n,
            products=lambda: tf.data.Dataset.from_tensor_slices(products)))
        ids = np.concatenate([r["category_id"] for r in rows]).tolist()
        failed = np.concatenate([r["undecodable"] for r in rows])
        decoded = np.concatenate([r["num_images"] for r in rows]).tolist()
        # Each row keeps which of its slots failed to decode: `_write_part` counts them.
        return [PredictionResult(x, (c, tuple(np.flatnonzero(f).tolist()), d))
                for x, c, f, d in zip(batch, ids, failed, decoded)]

    def batch_elements_kwargs(self) -> dict:
        return {"max_batch_size": self._batch_size}


def _read_range(element: tuple, bson: str, labeled: bool, max_pixels: int | None,
                work: str) -> Iterable:
    """Beam work: one range's products as ((range, position, _id), padded images),
    exactly the index's (`bsonfile.iter_products_at` checks each _id); the range's
    screening counts go to a stats file beside its part."""
    k, offsets, lengths, ids, cids = element
    stats = inference.PredictStats()
    reader = bsonfile.iter_products_at(bson, offsets, lengths, labeled=labeled,
                                       expect=(ids.tolist(), cids.tolist()))
    position = 0
    for batch in inference.screened(reader, stats, max_pixels):
        for product, images in batch:
            yield (k, position, product.product_id), images
            position += 1
    atomic.write(f"{work}/stats-{k:05d}.json", json.dumps(
        {name: getattr(stats, name) for name in _COUNTED + ("skipped_images",)}))


_COUNTED = ("images", "corrupt_images", "extra_images", "products_without_images")


def _write_part(group: tuple, work: str) -> None:
    """A range's rows in file order, and what its decode failed on (counted as a local
    predict counts it: `inference.count_undecodable`)."""
    k, rows = group
    rows = sorted(rows)
    stats = inference.PredictStats()
    undecodable = np.zeros((len(rows), input_pipeline.MAX_IMAGES))
    for i, (_, _, _, failed, _) in enumerate(rows):
        undecodable[i, list(failed)] = 1
    inference.count_undecodable(np.array([r[1] for r in rows]), undecodable,
                                np.array([r[4] for r in rows]), stats)
    atomic.write(f"{work}/decode-{k:05d}.json", json.dumps(
        {name: getattr(stats, name) for name in _COUNTED + ("skipped_images",)}))
    atomic.write(f"{work}/part-{k:05d}.csv",
                 "".join(f"{pid},{cid}\n" for _, pid, cid, *_ in rows))


def _join(ranges: list, work: str, output: str, stats: inference.PredictStats) -> None:
    """The parts in range order, checked complete, as one submission (atomically)."""
    with atomic.via_local(output) as local, open(local, "w") as f:
        f.write("_id,category_id\n")
        for k, offsets, *_ in ranges:
            with tf.io.gfile.GFile(f"{work}/part-{k:05d}.csv") as part:
                text = part.read()
            if text.count("\n") != len(offsets):
                raise RuntimeError(f"range {k} ({len(offsets)} products) came back with "
                                   f"{text.count(chr(10))} rows")
            f.write(text)
            for kind in ("stats", "decode"):  # the reader's screen, then the decode
                with tf.io.gfile.GFile(f"{work}/{kind}-{k:05d}.json") as s:
                    part_stats = json.load(s)
                for name in _COUNTED:
                    setattr(stats, name, getattr(stats, name) + part_stats[name])
                problems.extend(stats.skipped_images,
                                (tuple(x) for x in part_stats["skipped_images"]))
            stats.products += len(offsets)
