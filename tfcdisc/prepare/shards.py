"""One output shard from its recipe: read its members, screen their images, write.

A `ShardSpec` (made by `tfcdisc.prepare.plan`) is small and picklable; calling it streams
the shard's examples, so the local build's worker processes and Beam workers (TFDS
calls it) run the same code and write the same shards. A shard reads only its members
file and the BSON bytes of its members: a train shard reads its runs, spread over the
file, interleaved (so it mixes many categories without an in-memory shuffle).

Every JPEG is screened (`tfcdisc.catalogue.screen`: header, then one decode at 1/8 scale), so
whatever the build keeps decodes; bytes are moved untouched. Policy
``bad_images="drop"``: a bad image is dropped and counted; a labelled product left with
no image is dropped and counted; a test product is kept (with no images) so that it
still gets a prediction. ``"fail"`` stops at the first. Each shard writes a small stats
file; `collect_stats` adds them up for the dataset's metadata and the build log.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator, Sequence

import tensorflow as tf

from tfcdisc.catalogue import atomic, bsonfile, problems, screen
from tfcdisc.prepare import records
from tfcdisc.catalogue import taxonomy as taxonomy_lib

TRAIN, VALIDATION, TEST = "train", "validation", "test"
NO_LABEL = -1
_SCREEN_PRODUCTS = 128  # products whose images are decoded in one call


@dataclasses.dataclass
class BuildOptions:
    """Everything that decides the content of a build (and so must match across paths);
    the TFDS builder's config is these fields (`tfds build --config '{"name": ...}'`).

    Attributes:
      validation_size: products held out of train.bson; None means 2% of them or
        50,000, whichever is smaller, but at least one per category.
      seed: chooses the validation products.
      shard_mb: target MB of BSON read into one output shard.
      runs_per_shard: separate stretches of train.bson interleaved into one shard.
      image_height, image_width: the size every image must have; None accepts any size.
      bad_images: "drop" (count and go on) or "fail" (stop at the first bad image).
      bad_documents: "fail" (stop at the first document that cannot be read, naming its
        byte offset) or "skip" (resynchronise, count and list what was lost: a product
        whose document is unreadable cannot be in any split).
      decode_images: also decode every image once (at 1/8 scale) and drop what fails.
        False (the default) checks headers only, twice as fast (benchmarks/RESULTS.md):
        an image whose scan data is garbage is then kept, and the pipelines' own decode
        masks and counts it when it is drawn (`input_pipeline.decode_failsafe`), so it
        never stops a run either way.
    """

    validation_size: int | None = None
    seed: int = 0
    shard_mb: int = 128
    runs_per_shard: int = 32
    image_height: int | None = 180
    image_width: int | None = 180
    bad_images: str = "drop"
    bad_documents: str = "fail"
    decode_images: bool = False

    @property
    def shard_bytes(self) -> int:
        return self.shard_mb << 20

    @property
    def image_size(self) -> tuple[int, int] | None:
        return (self.image_height, self.image_width) if self.image_height else None

    def plain(self) -> BuildOptions:
        """These options alone (a builder config carries more), for workers and metadata."""
        return BuildOptions(**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(BuildOptions)})

    def metadata(self) -> dict:
        """What the dataset's metadata records (``image_size`` is what exports read)."""
        return {**dataclasses.asdict(self.plain()), "image_size": self.image_size}

    def __post_init__(self):
        if self.bad_images not in ("drop", "fail"):
            raise ValueError(f"bad_images must be 'drop' or 'fail', not {self.bad_images!r}")
        if self.bad_documents not in ("fail", "skip"):
            raise ValueError(f"bad_documents must be 'fail' or 'skip', not "
                             f"{self.bad_documents!r}")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """One output shard: call it to stream its (key, example) pairs."""

    split: str
    shard: int
    bson_path: str
    members_path: str  # written by the plan: offsets, lengths, ids, categories, runs
    category_names: str
    options: BuildOptions
    stats_path: str
    num_products: int = 0  # products this shard reads (before drops)

    def __call__(self) -> Iterator[tuple[int, dict]]:
        return _generate(self)


@functools.lru_cache(maxsize=2)
def _labels(category_names: str) -> dict[int, tuple[int, int, int]]:
    tax = taxonomy_lib.load(category_names)
    l2 = tax.class_to_level2
    l1 = tax.level2_to_level1[l2]
    return {int(c): (i, int(l1[i]), int(l2[i])) for i, c in enumerate(tax.category_ids)}


def _interleave(spec: ShardSpec) -> Iterator[bsonfile.Product]:
    """The members, taking one product from each run in turn."""
    m = atomic.read_arrays(spec.members_path)
    labeled = bool(m["labeled"])
    bounds = [*m["run_starts"].tolist(), len(m["offsets"])]
    streams = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        expect = (m["product_ids"][lo:hi].tolist(), m["category_ids"][lo:hi].tolist())
        streams.append(bsonfile.iter_products_at(
            spec.bson_path, m["offsets"][lo:hi], m["lengths"][lo:hi], labeled=labeled,
            expect=expect, span_bytes=1 << 20))
    while streams:
        alive = []
        for stream in streams:
            product = next(stream, None)
            if product is not None:
                yield product
                alive.append(stream)
        streams = alive


def _generate(spec: ShardSpec) -> Iterator[tuple[int, dict]]:
    labels = _labels(spec.category_names) if spec.split != TEST else None
    size = spec.options.image_size
    stats = {"split": spec.split, "shard": spec.shard, "products": 0, "images": 0,
             "dropped_images": {}, "dropped_products": 0, "products_without_images": 0,
             "examples": []}
    for chunk in screen.screen_products(_interleave(spec), _SCREEN_PRODUCTS, size=size,
                                        decode=spec.options.decode_images):
        for product, verdicts in chunk:
            images = []
            for k, (data, e) in enumerate(zip(product.images, verdicts)):
                if e is None:
                    images.append(data)
                    continue
                where = (f"{spec.bson_path}: byte offset {product.offset} (_id "
                         f"{product.product_id}) image {k}: {e}")
                if spec.options.bad_images == "fail":
                    raise ValueError(where + "; the build's bad_images policy is 'fail'")
                stats["dropped_images"][e.kind] = stats["dropped_images"].get(e.kind, 0) + 1
                problems.note(stats["examples"], where)
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
                    "its .idx.npz index and build again")
            stats["products"] += 1
            stats["images"] += len(images)
            yield product.product_id, {
                "product_id": product.product_id, "images": images,
                "num_images": len(images), "label": label[0], "label_level1": label[1],
                "label_level2": label[2]}
    with tf.io.gfile.GFile(spec.stats_path, "w") as f:
        f.write(json.dumps(stats))


def collect_stats(specs: dict[str, list[ShardSpec]], unreadable: dict) -> dict:
    """Adds up the shards' stats files into per-split and total counts, beside what each
    BSON file's reading skipped (``unreadable``: products lost to every split)."""
    out = {"dropped_images": {}, "dropped_products": 0, "products_without_images": 0,
           "splits": {}, "examples": [], "unreadable": unreadable}
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
            problems.extend(out["examples"], shard["examples"])
        out["splits"][split] = s
        out["dropped_products"] += s["dropped_products"]
        out["products_without_images"] += s["products_without_images"]
    return out


# --------------------------------------------------------------------------- local writing


def default_workers() -> int:
    """Processes for a local build: TFCDISC_BUILD_WORKERS, else every core."""
    return int(os.environ.get("TFCDISC_BUILD_WORKERS", 0)) or os.cpu_count() or 1


def write_shard(spec: ShardSpec, path: str, file_format=None) -> int:
    """Writes one shard file; returns its number of examples.

    TFRecord shards are written with `records.serialize`; other formats go through TFDS's own
    shard writer.
    """
    if getattr(file_format, "value", file_format) in (None, "tfrecord"):
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
def _features_for(category_names: str, image_size):
    return records.features(taxonomy_lib.load(category_names), image_size)


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Spawned workers (TensorFlow does not survive fork) that die with their launcher: a
    SIGKILL-ed `tfds build` left its workers finishing their shards and then blocked
    forever on a pipe, about 750 MB each."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_launcher, initargs=(os.getpid(),))


def _exit_with_launcher(launcher: int) -> None:
    """Worker start: the kernel kills this process when its launcher dies (Linux
    ``PR_SET_PDEATHSIG``); elsewhere a thread watches for the launcher's end."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != launcher:  # it died before the call above
            os._exit(1)
        return
    import threading

    def watch():
        while os.getppid() == launcher:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-launcher").start()


def write_shards(tasks: Sequence[tuple[ShardSpec, str, object]], workers: int,
                 progress: bool = True) -> list[int]:
    """Writes shards on ``workers`` processes; returns their lengths, in task order.

    The workers (`worker_pool`) die with this process; like any spawned pool they import
    the caller's main script,
    so a script that builds must guard its work with ``if __name__ == "__main__"``
    (the `tfds` command, notebooks and pytest do).
    """
    from tqdm import tqdm
    total = sum(spec.num_products for spec, _, _ in tasks)
    bar = tqdm(total=total, unit=" products", desc="Writing shards", disable=not progress,
               mininterval=2.0)
    results: list = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            results[i] = _named(task[1], lambda: write_shard(*task))
            bar.update(task[0].num_products)
    else:
        with worker_pool(min(workers, len(tasks))) as pool:
            futures = {pool.submit(write_shard, *task): i for i, task in enumerate(tasks)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    results[i] = _named(tasks[i][1], future.result)
                    bar.update(tasks[i][0].num_products)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    bar.close()
    return results


class ShardWriteError(RuntimeError):
    """A shard could not be written (a full disk, a folder this user cannot write)."""


def _named(path: str, write):
    """``write()``, its failure in one line naming the shard (a worker's exception came
    back as a RemoteTraceback of the worker's stack)."""
    try:
        return write()
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "message", None) or str(e)
        raise ShardWriteError(
            f"writing {path}: {type(e).__name__}: {reason}; the build stopped and keeps "
            "nothing of it: free space (or fix the folder), then rerun the same command"
            ) from None
