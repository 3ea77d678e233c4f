"""From an indexed Kaggle folder to TFDS examples: splits, shards, labels, bad images.

The TFDS builder (`tfds_builder/cdiscount`) is a thin wrapper around this module,
so that local worker processes and Beam workers run exactly the same code:

  * `plan` decides, from the offset indexes alone, which product goes to which split
    and shard. The validation split is a stratified, hash-chosen hold-out from
    train.bson (a slice of the file would not be stratified, whatever its order).
  * A `ShardSpec` is a small picklable recipe for one output shard. Calling it
    streams that shard's examples: train shards read many runs spread over the file,
    interleaved, so each shard mixes many categories without any in-memory shuffle.
  * Every JPEG is screened (`tfcdisc.screen`: header, then one decode at 1/8 scale),
    so whatever the build keeps decodes; bytes are moved untouched.
    Policy ``bad_images="drop"``: a bad image is dropped and counted; a labelled
    product left with no image is dropped and counted; a test product is kept (with
    no images) so that it still gets a prediction. ``"fail"`` stops at the first.
  * Each shard writes a small stats file; `collect_stats` adds them up for the
    dataset's metadata and the build log.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import traceback
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfcdisc import index as index_lib
from tfcdisc import records, screen
from tfcdisc import taxonomy as taxonomy_lib

TRAIN, VALIDATION, TEST = "train", "validation", "test"
MANUAL_FILES = ("train.bson", "test.bson", "category_names.csv")
NO_LABEL = -1
_MAX_RECORDED = 1000  # bad images listed (file, offset, _id, image, why); counts are exact
_SCREEN_PRODUCTS = 128  # products whose images are decoded in one call


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that decides the content of a build (and so must match across paths).

    Attributes:
      validation_size: products held out of train.bson; None means 2% of them or
        50,000, whichever is smaller, but at least one per category.
      seed: chooses the validation products.
      shard_bytes: target BSON bytes read into one output shard.
      runs_per_shard: separate stretches of train.bson interleaved into one shard.
      image_size: (height, width) every image must have; None accepts any size.
      bad_images: "drop" (count and go on) or "fail" (stop at the first bad image).
      decode_images: decode every image once (at 1/8 scale) so that nothing undecodable
        reaches training; False checks headers only (faster: see benchmarks/RESULTS.md),
        and an image with a garbled scan then stops training when it is drawn.
      bad_documents: "fail" (stop at the first document that cannot be read, naming its
        byte offset) or "skip" (resynchronise, count and list what was lost: a product
        whose document is unreadable cannot be in any split).
    """

    validation_size: int | None = None
    seed: int = 0
    shard_bytes: int = 128 << 20
    runs_per_shard: int = 32
    image_size: tuple[int, int] | None = (180, 180)
    bad_images: str = "drop"
    bad_documents: str = "fail"
    decode_images: bool = True

    def __post_init__(self):
        if self.bad_images not in ("drop", "fail"):
            raise ValueError(f"bad_images must be 'drop' or 'fail', not {self.bad_images!r}")
        if self.bad_documents not in ("fail", "skip"):
            raise ValueError(f"bad_documents must be 'fail' or 'skip', not "
                             f"{self.bad_documents!r}")


# --------------------------------------------------------------------------- features


def level2_label_names(taxonomy: taxonomy_lib.Taxonomy) -> list[str]:
    """Unique names of level-2 nodes: a name under two parents appears twice otherwise."""
    return [f"{taxonomy.level1_names[p]} / {n}"
            for n, p in zip(taxonomy.level2_names, taxonomy.level2_to_level1)]


def features(taxonomy: taxonomy_lib.Taxonomy | None,
             image_size: tuple[int, int] | None = (180, 180)) -> tfds.features.FeaturesDict:
    """The dataset's features. Without a taxonomy the ClassLabels get names later."""
    shape = (*image_size, 3) if image_size else (None, None, 3)
    names = (None, None, None) if taxonomy is None else (
        [str(c) for c in taxonomy.category_ids], list(taxonomy.level1_names),
        level2_label_names(taxonomy))
    return tfds.features.FeaturesDict({
        "product_id": tfds.features.Scalar(np.int64, doc="The product's _id in the BSON."),
        "images": tfds.features.Sequence(
            tfds.features.Image(shape=shape, encoding_format="jpeg"),
            doc="The product's JPEGs, bytes exactly as in the BSON (1-4 per product)."),
        "num_images": tfds.features.Scalar(np.int32, doc="len(images)"),
        "label": tfds.features.ClassLabel(names=names[0], doc="category_id as a string; "
                                          "-1 in the test split"),
        "label_level1": tfds.features.ClassLabel(names=names[1], doc="-1 in the test split"),
        "label_level2": tfds.features.ClassLabel(names=names[2], doc="-1 in the test split"),
    })


def set_label_names(feature_dict: tfds.features.FeaturesDict,
                    taxonomy: taxonomy_lib.Taxonomy) -> None:
    """Names the ClassLabels of a dict made by `features(None)` after the CSV is read."""
    feature_dict["label"].names = [str(c) for c in taxonomy.category_ids]
    feature_dict["label_level1"].names = list(taxonomy.level1_names)
    feature_dict["label_level2"].names = level2_label_names(taxonomy)


# --------------------------------------------------------------------------- planning


def validation_quota(sizes: np.ndarray, total: int) -> np.ndarray:
    """Products to hold out per category: proportional to its size, at least one for
    every category with two or more products (so small ones are represented), and
    never a category's last product."""
    sizes = np.asarray(sizes, np.int64)
    cap = np.maximum(sizes - 1, 0)
    total = int(min(total, cap.sum()))
    floor = (sizes >= 2).astype(np.int64)
    if floor.sum() > total:  # too few to give every category one: largest first
        quota = np.zeros_like(sizes)
        quota[np.argsort(-sizes, kind="stable")[:total]] = 1
        return np.minimum(quota, cap)
    quota = floor.copy()
    share = (total - quota.sum()) * (cap - floor) / max((cap - floor).sum(), 1)
    quota += np.floor(share).astype(np.int64)
    remainder = total - quota.sum()
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for c in order:
        if remainder <= 0:
            break
        if quota[c] < cap[c]:
            quota[c] += 1
            remainder -= 1
    return np.minimum(quota, cap)


def _mix(ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random order of product ids (splitmix64), the same on every worker."""
    z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_mask(index: index_lib.OffsetIndex, options: BuildOptions) -> np.ndarray:
    """True for the products of train.bson held out as the validation split."""
    n = len(index)
    cats, inverse, sizes = np.unique(index.category_ids, return_inverse=True,
                                     return_counts=True)
    total = options.validation_size
    if total is None:  # 2% or 50,000, but never fewer than one per category
        total = min(max(int(round(0.02 * n)), int((sizes >= 2).sum())), 50_000)
    quota = validation_quota(sizes, total)
    order = np.lexsort((_mix(index.product_ids, options.seed), inverse))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    return rank < quota[inverse]


def _shard_runs(n: int, n_shards: int, runs_per_shard: int) -> list[list[tuple[int, int]]]:
    """Cuts positions [0, n) into n_shards * runs_per_shard runs; shard j takes every
    n_shards-th run, so its runs are spread evenly across the file."""
    pieces = max(1, min(n, n_shards * runs_per_shard))
    cuts = np.linspace(0, n, pieces + 1).astype(np.int64)
    return [[(int(cuts[p]), int(cuts[p + 1])) for p in range(j, pieces, n_shards)
             if cuts[p + 1] > cuts[p]] for j in range(n_shards)]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One output shard: which products, read how. Small and picklable; call it to
    stream the shard's (key, example) pairs."""

    split: str
    shard: int
    bson_path: str
    index_path: str
    category_names: str
    runs: tuple[tuple[int, int], ...]
    members: str  # "all", "train" (not validation) or "validation"
    options: BuildOptions
    stats_path: str
    num_products: int = 0  # products this shard reads for its split (before drops)

    def __call__(self) -> Iterator[tuple[int, dict]]:
        return _generate(self)


def plan(manual_dir: str, work_dir: str, options: BuildOptions, indexes: dict | None = None
         ) -> tuple[dict[str, list[ShardSpec]], taxonomy_lib.Taxonomy, np.ndarray]:
    """Indexes the BSON files (or reuses their indexes) and lays out every shard.

    Args:
      manual_dir: the Kaggle folder (local or gs://).
      work_dir: scratch folder readable by every worker (indexes, shard stats).
      options: what decides the content of the build.
      indexes: already-loaded indexes by file name (tests), else built or reused.

    Returns:
      ({split: [ShardSpec, ...]}, taxonomy, class_counts). Shards without products are
      left out; class_counts[c] is the number of training products of class c.
    """
    paths = check_manual_dir(manual_dir)
    taxonomy = taxonomy_lib.load(paths["category_names.csv"])
    tf.io.gfile.makedirs(work_dir)
    for old in tf.io.gfile.glob(_join(work_dir, "*.stats.json")):
        tf.io.gfile.remove(old)
    indexes = dict(indexes or {})
    for name in ("train.bson", "test.bson"):
        if name not in indexes:
            logging.info("indexing %s", paths[name])
            indexes[name] = index_lib.load_or_build(
                paths[name], index_path=_join(work_dir, name + ".idx.npz"),
                errors="skip" if options.bad_documents == "skip" else "strict")
    train, test = indexes["train.bson"], indexes["test.bson"]
    if not train.labeled:
        raise ValueError(f"{paths['train.bson']}: no category_id in its products; is it a "
                         "test file?")
    _check_categories(train, taxonomy)
    holdout = validation_mask(train, options)
    class_counts = np.bincount(taxonomy.class_index(train.category_ids[~holdout]),
                               minlength=taxonomy.num_classes)
    specs: dict[str, list[ShardSpec]] = {}
    layouts = ((TRAIN, train, "train", ~holdout, options.runs_per_shard),
               (VALIDATION, train, "validation", holdout, options.runs_per_shard),
               (TEST, test, "all", np.ones(len(test), bool), 1))
    for split, index, members, mask, runs_per_shard in layouts:
        member_bytes = int(index.lengths[mask].sum(dtype=np.int64))
        n_shards = max(2, math.ceil(member_bytes / options.shard_bytes))
        n_shards = min(n_shards, max(1, int(mask.sum())))
        counts = np.concatenate([[0], np.cumsum(mask)])
        specs[split] = []
        for runs in _shard_runs(len(index), n_shards, runs_per_shard):
            num = int(sum(counts[hi] - counts[lo] for lo, hi in runs))
            if not num:
                continue
            k = len(specs[split])
            specs[split].append(ShardSpec(
                split, k, index.path, index.stored_at or "", paths["category_names.csv"],
                tuple(runs), members, options,
                _join(work_dir, f"{split}-{k:05d}.stats.json"), num))
    return specs, taxonomy, class_counts


def check_manual_dir(manual_dir: str) -> dict[str, str]:
    """Paths of the Kaggle files; a missing one is named with what to do."""
    paths = {name: _join(manual_dir, name) for name in MANUAL_FILES}
    missing = [name for name, p in paths.items() if not tf.io.gfile.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{manual_dir}: missing {', '.join(missing)}. Put the Kaggle Cdiscount files "
            f"({', '.join(MANUAL_FILES)}) in this folder (local or gs://) and pass it as "
            "--manual_dir.")
    return paths


def _check_categories(index: index_lib.OffsetIndex, taxonomy: taxonomy_lib.Taxonomy) -> None:
    known = np.isin(index.category_ids, taxonomy.category_ids)
    if not known.all():
        j = int(np.flatnonzero(~known)[0])
        raise ValueError(
            f"{index.path}: byte offset {int(index.offsets[j])} (document #{j}, _id "
            f"{int(index.product_ids[j])}): category_id {int(index.category_ids[j])} is not in "
            f"category_names.csv ({int((~known).sum())} products in all); use the "
            "category_names.csv that belongs to this train.bson")


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


# --------------------------------------------------------------------------- generation


def _index(index_path: str, bson_path: str) -> index_lib.OffsetIndex:
    """The shard's index, loaded once per process while the index file is unchanged."""
    stamp = tf.io.gfile.stat(index_path).mtime_nsec if index_path else 0
    return _cached_index(index_path, bson_path, stamp)


@functools.lru_cache(maxsize=4)
def _cached_index(index_path: str, bson_path: str, stamp: int) -> index_lib.OffsetIndex:
    del stamp  # part of the cache key: a rebuilt index has a new one
    if index_path:
        return index_lib.load(index_path, bson_path)
    return index_lib.load_or_build(bson_path)


def _members(index_path: str, bson_path: str, members: str, options: BuildOptions):
    if members == "all":
        return None
    return _holdout(_index(index_path, bson_path), options, members)


@functools.lru_cache(maxsize=4)
def _holdout(index: index_lib.OffsetIndex, options: BuildOptions, members: str) -> np.ndarray:
    holdout = validation_mask(index, options)
    return holdout if members == "validation" else ~holdout


@functools.lru_cache(maxsize=2)
def _labels(category_names: str) -> dict[int, tuple[int, int, int]]:
    tax = taxonomy_lib.load(category_names)
    l2 = tax.class_to_level2
    l1 = tax.level2_to_level1[l2]
    return {int(c): (i, int(l1[i]), int(l2[i])) for i, c in enumerate(tax.category_ids)}


def _interleave(index: index_lib.OffsetIndex, runs) -> Iterator[tuple[int, object]]:
    """(position, product) taking one product from each run in turn."""
    streams = [[lo, index.iter_products(index.positions(lo, hi))] for lo, hi in runs]
    while streams:
        alive = []
        for stream in streams:
            product = next(stream[1], None)
            if product is None:
                continue
            yield stream[0], product
            stream[0] += 1
            alive.append(stream)
        streams = alive


def _chunks(items, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _generate(spec: ShardSpec) -> Iterator[tuple[int, dict]]:
    index = _index(spec.index_path, spec.bson_path)
    keep = _members(spec.index_path, spec.bson_path, spec.members, spec.options)
    labels = _labels(spec.category_names) if spec.split != TEST else None
    size = spec.options.image_size
    stats = {"split": spec.split, "shard": spec.shard, "products": 0, "images": 0,
             "dropped_images": {}, "dropped_products": 0, "products_without_images": 0,
             "examples": []}
    members = (product for position, product in _interleave(index, spec.runs)
               if keep is None or keep[position])
    for chunk in _chunks(members, _SCREEN_PRODUCTS):
        problems = iter(screen.screen([data for p in chunk for data in p.images], size,
                                      decode=spec.options.decode_images))
        for product in chunk:
            images = []
            for k, data in enumerate(product.images):
                e = next(problems)
                if e is None:
                    images.append(data)
                    continue
                where = (f"{spec.bson_path}: byte offset {product.offset} (_id "
                         f"{product.product_id}) image {k}: {e}")
                if spec.options.bad_images == "fail":
                    raise ValueError(where + "; the build's bad_images policy is 'fail'")
                stats["dropped_images"][e.kind] = stats["dropped_images"].get(e.kind, 0) + 1
                if len(stats["examples"]) < _MAX_RECORDED:
                    stats["examples"].append(where)
            if not images:
                if labels is not None:
                    stats["dropped_products"] += 1
                    continue
                stats["products_without_images"] += 1
            label = (NO_LABEL,) * 3 if labels is None else labels.get(product.category_id)
            if label is None:  # the plan checked every category: the file changed since
                raise ValueError(
                    f"{spec.bson_path}: byte offset {product.offset} (_id "
                    f"{product.product_id}): category_id {product.category_id} is not in "
                    f"{spec.category_names}; the file changed after it was indexed: delete "
                    f"{spec.index_path or 'its .idx.npz index'} and build again")
            stats["products"] += 1
            stats["images"] += len(images)
            yield product.product_id, {
                "product_id": product.product_id, "images": images,
                "num_images": len(images), "label": label[0], "label_level1": label[1],
                "label_level2": label[2]}
    with tf.io.gfile.GFile(spec.stats_path, "w") as f:
        f.write(json.dumps(stats))


def collect_stats(specs: dict[str, list[ShardSpec]]) -> dict:
    """Adds up the shards' stats files into per-split and total counts, with what each
    BSON file's reading skipped (bad documents and bytes: products lost to every split)."""
    out = {"dropped_images": {}, "dropped_products": 0, "products_without_images": 0,
           "splits": {}, "examples": [], "unreadable": {}}
    for split, shard_specs in specs.items():
        s = {"products": 0, "images": 0, "dropped_images": 0, "dropped_products": 0,
             "products_without_images": 0}
        for spec in shard_specs:
            with tf.io.gfile.GFile(spec.stats_path) as f:
                shard = json.loads(f.read())
            for key in ("products", "images", "dropped_products", "products_without_images"):
                s[key] += shard[key]
            for kind, n in shard["dropped_images"].items():
                out["dropped_images"][kind] = out["dropped_images"].get(kind, 0) + n
                s["dropped_images"] += n
            out["examples"].extend(shard["examples"][:_MAX_RECORDED - len(out["examples"])])
        out["splits"][split] = s
        out["dropped_products"] += s["dropped_products"]
        out["products_without_images"] += s["products_without_images"]
        for spec in shard_specs[:1]:
            index = _index(spec.index_path, spec.bson_path)
            if index.bad_documents or index.skipped_bytes:
                out["unreadable"][spec.bson_path] = {
                    "bad_documents": index.bad_documents,
                    "bad_document_bytes": index.bad_document_bytes,
                    "skipped_bytes": index.skipped_bytes,
                    "lost": [list(p) for p in index.problems[:_MAX_RECORDED]]}
    return out


# --------------------------------------------------------------------------- local writing


def default_workers() -> int:
    """Processes for a local build: TFCDISC_BUILD_WORKERS, else every core."""
    return int(os.environ.get("TFCDISC_BUILD_WORKERS", 0)) or os.cpu_count() or 1


def write_shard(task: tuple[ShardSpec, str, object]) -> int:
    """Writes one shard file (runs in a worker process).

    TFRecord shards are written with `records.serialize`; other formats go through TFDS's own
    shard writer.
    """
    spec, path, file_format = task
    if getattr(file_format, "value", file_format) == "tfrecord":
        n = 0
        with tf.io.TFRecordWriter(path) as writer:
            for _, example in spec():
                writer.write(records.serialize(example))
                n += 1
        return n
    from etils import epath
    from tensorflow_datasets.core import example_serializer, writer as writer_lib
    feature_dict = _features_for(spec.category_names, spec.options.image_size)
    writer = writer_lib.ShardWriter(
        features=feature_dict,
        serializer=example_serializer.ExampleSerializer(feature_dict.get_serialized_info()),
        example_writer=writer_lib.ExampleWriter(file_format=file_format))
    return writer.write(path=epath.Path(path), examples=spec())


@functools.lru_cache(maxsize=2)
def _features_for(category_names: str, image_size) -> tfds.features.FeaturesDict:
    return features(taxonomy_lib.load(category_names), image_size)


def write_shards_in_parallel(tasks: Sequence[tuple[ShardSpec, str, object]],
                             workers: int, progress: bool = True) -> list[int]:
    """Writes shards on ``workers`` long-lived worker processes; returns their lengths.

    Workers are ``python -m tfcdisc.examples --worker`` subprocesses fed pickled tasks by
    one driver thread each, rather than a multiprocessing pool: a spawned pool would
    re-import the caller's main script (a notebook, or a script without a __main__
    guard), and TensorFlow does not survive fork.
    """
    from tqdm import tqdm
    total = sum(spec.num_products for spec, _, _ in tasks)
    bar = tqdm(total=total, unit=" products", desc="Writing shards", disable=not progress,
               mininterval=2.0)
    results: list = [None] * len(tasks)
    queue = collections.deque(enumerate(tasks))
    lock = threading.Lock()

    def drive() -> None:
        proc = subprocess.Popen([sys.executable, "-m", "tfcdisc.examples", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    i, task = queue.popleft()
                pickle.dump(task, proc.stdin)
                proc.stdin.flush()
                try:
                    ok, value = pickle.load(proc.stdout)
                except EOFError:
                    raise RuntimeError(f"shard worker died writing {task[1]} "
                                       f"(exit status {proc.wait()}); see its log above") from None
                if not ok:
                    with lock:
                        queue.clear()  # stop the other workers early
                    raise value
                results[i] = value
                bar.update(task[0].num_products)
        finally:
            proc.stdin.close()
            proc.wait()

    if workers <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            results[i] = write_shard(task)
            bar.update(task[0].num_products)
    else:
        with concurrent.futures.ThreadPoolExecutor(min(workers, len(tasks))) as pool:
            for future in [pool.submit(drive) for _ in range(min(workers, len(tasks)))]:
                future.result()
    bar.close()
    return results


def _serve() -> None:
    """Worker loop: pickled tasks in on stdin, pickled (ok, result) out on a private fd.

    The process's own stdout is pointed at stderr, so a stray print cannot corrupt
    the protocol.
    """
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        try:
            task = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            reply = (True, write_shard(task))
        except Exception as e:  # sent to the parent, which re-raises it
            reply = (False, e)
        try:
            data = pickle.dumps(reply)
        except Exception:
            data = pickle.dumps((False, RuntimeError(traceback.format_exc())))
        channel.write(data)
        channel.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
