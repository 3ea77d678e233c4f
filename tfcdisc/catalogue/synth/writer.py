"""Writing a synthetic catalogue: workers render products, the BSON files and CSVs are
written whole (`generate`); `replicate` makes a larger one from copies."""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
import time
from typing import Iterator

import bson
import numpy as np

from tfcdisc.catalogue.synth.drawing import _noise_style, render_product
from tfcdisc.catalogue.synth.plan import Plan, plan_catalogue
from tfcdisc.catalogue.synth.styles import (_NOISE_POOL, DIFFICULTIES, CategoryStyle,
                                            Difficulty, builtin_taxonomy_frame,
                                            category_styles, sample_categories)

_CHUNK = 128  # products per worker task


_WORKER_STYLES: list[CategoryStyle] = []
_WORKER_DIFFICULTY = Difficulty()
_POOL: dict = {}  # pooled images (stock photos, noise), rendered once per worker


def _init_worker(styles: list[CategoryStyle], difficulty: Difficulty) -> None:
    global _WORKER_STYLES, _WORKER_DIFFICULTY
    _WORKER_STYLES, _WORKER_DIFFICULTY = styles, difficulty
    _POOL.clear()


def _pooled(seed: int, key: tuple) -> bytes:
    """A pooled image, the same bytes wherever it is used."""
    if key not in _POOL:
        if key[0] == "noise":
            style = _noise_style((seed, 98, key[1]))
        elif key[2] % 2:  # a stock photo that does not look like its category
            style = _noise_style((seed, 97, key[1], key[2]))
        else:
            style = _WORKER_STYLES[key[1]]
        _POOL[key] = render_product(style, 1, (seed, 99, *key[1:]))[0]
    return _POOL[key]


def _pictures(seed: int, split: int, pid: int, cls: int, n: int) -> list[bytes]:
    """A product's images: views of its item, some replaced by pooled images when hard."""
    pictures = render_product(_WORKER_STYLES[cls], n, (seed, split, pid))
    d = _WORKER_DIFFICULTY
    if not (d.noise_images or d.stock_images):
        return pictures
    for j in range(n):
        u = np.random.default_rng([seed, split, pid, j, 11]).random(2)
        if u[0] < d.noise_images:
            pictures[j] = _pooled(seed, ("noise", int(u[1] * _NOISE_POOL)))
        elif u[0] < d.noise_images + d.stock_images:
            pictures[j] = _pooled(seed, ("stock", cls, int(u[1] * d.stock_pool)))
    return pictures


def _encode_chunk(task) -> tuple[bytes, int, np.ndarray]:
    """Renders and BSON-encodes a run of products (runs in a worker process).

    Returns the documents, the number of JPEG bytes among them, and (fingerprint, written
    class) per image, to count duplicates.
    """
    seed, split, ids, classes, counts, labels, category_ids = task
    out, seen = [], []
    jpeg_bytes = 0
    for pid, cls, n, label, cid in zip(ids, classes, counts, labels, category_ids):
        pictures = _pictures(seed, split, int(pid), int(cls), int(n))
        jpeg_bytes += sum(map(len, pictures))
        seen.extend((int.from_bytes(hashlib.blake2b(p, digest_size=8).digest(), "little"),
                     int(label)) for p in pictures)
        doc = {"_id": int(pid), "imgs": [{"picture": p} for p in pictures]}
        if cid is not None:
            doc["category_id"] = int(cid)
        out.append(bson.encode(doc))
    return b"".join(out), jpeg_bytes, np.array(seen, np.uint64).reshape(-1, 2)


def _tasks(plan: Plan, split: int, seed: int, category_ids, labeled: bool) -> Iterator:
    labels = plan.classes if plan.labels is None else plan.labels
    for i in range(0, len(plan.product_ids), _CHUNK):
        sl = slice(i, i + _CHUNK)
        cids = category_ids[labels[sl]] if labeled else [None] * len(plan.product_ids[sl])
        yield (seed, split, plan.product_ids[sl], plan.classes[sl], plan.num_images[sl],
               labels[sl], cids)


def _write_atomic(path: str, chunks, progress=None) -> int:
    """Streams chunks into ``path``, replaced whole (`tfcdisc.catalogue.atomic`); returns the bytes."""
    from tfcdisc.catalogue import atomic
    total = 0
    with atomic.writing(path) as f:
        for chunk in chunks:
            f.write(chunk)
            total += len(chunk)
            if progress:
                progress(chunk)
    return total


# What a catalogue folder holds: synth replaces none of them unless told to.
CATALOGUE_FILES = ("train.bson", "test.bson", "category_names.csv", "test_labels.csv")


def generate(output_dir: str, num_train_products: int, num_test_products: int, *,
             num_categories: int | None = None, category_names: str | None = None,
             seed: int = 0, workers: int | None = None, verbose: bool = False,
             difficulty: str = "easy", overwrite: bool = False) -> dict:
    """Writes a synthetic catalogue in the Kaggle layout; returns a summary dict.

    Args:
      output_dir: local or gs:// folder (created if missing).
      num_train_products, num_test_products: products in train.bson / test.bson.
      num_categories: categories actually used (default: 40, or all of a small file).
      category_names: a category_names.csv to sample real categories from; it is
        copied whole into the output, as a user's folder would have it.
      seed: the catalogue is a deterministic function of its arguments and seed.
      workers: processes rendering images (default: every core).
      difficulty: "easy" (clean, distinct looks) or "hard" (`DIFFICULTIES`: shared looks
        within a level-1 branch, noise images, stock photos reused across products and
        between train and test, wrong training labels).
      overwrite: replace a catalogue already in ``output_dir``; without it such a folder is
        refused (a user's real train.bson can no longer be downloaded).
    """
    import tensorflow as tf
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"--difficulty={difficulty}: choose from {', '.join(DIFFICULTIES)}")
    present = [n for n in CATALOGUE_FILES if tf.io.gfile.exists(f"{output_dir.rstrip('/')}/{n}")]
    if present and not overwrite:
        raise ValueError(f"{output_dir} holds a catalogue ({', '.join(present)}); give another "
                         "--output_dir, or --overwrite to replace it")
    hard = DIFFICULTIES[difficulty]
    rng = np.random.default_rng(seed)
    tf.io.gfile.makedirs(output_dir)
    join = lambda name: output_dir.rstrip("/") + "/" + name  # noqa: E731
    full, used = _write_taxonomy(category_names, num_categories, rng, join("category_names.csv"))
    k = len(used)
    styles = [category_styles(full, hard.shared_look)[c] for c in used]
    category_ids = full.category_ids[used]
    train, test = plan_catalogue(k, num_train_products, num_test_products, rng,
                                 hard.wrong_labels)
    start = time.perf_counter()
    sizes, jpeg_bytes, seen = _write_bson_files(join, {"train.bson": train, "test.bson": test},
                                                styles, hard, seed, category_ids,
                                                workers or multiprocessing.cpu_count(), verbose)
    elapsed = time.perf_counter() - start
    _write_label_files(join, train, test, category_ids)
    total_products = num_train_products + num_test_products
    images = int(train.num_images.sum() + test.num_images.sum())
    return {
        "output_dir": output_dir,
        "train_products": num_train_products,
        "test_products": num_test_products,
        "categories": k,
        "images": images,
        "bytes": sizes,
        "seconds": round(elapsed, 2),
        "products_per_second": round(total_products / max(elapsed, 1e-9), 1),
        "mean_jpeg_bytes": round(jpeg_bytes / max(images, 1), 1),
        "difficulty": difficulty,
        "wrong_training_labels": int((train.labels != train.classes).sum())
        if train.labels is not None else 0,
        "duplicates": duplicate_rates(np.concatenate(seen["train.bson"]),
                                      np.concatenate(seen["test.bson"] or [np.zeros((0, 2))])),
    }


def _write_taxonomy(category_names: str | None, num_categories: int | None,
                    rng: np.random.Generator, path: str):
    """The taxonomy sampled from and the categories used; writes category_names.csv (a
    given file whole, as a user's folder has it; else the built-in taxonomy's used part)."""
    import tensorflow as tf
    from tfcdisc.catalogue import taxonomy as taxonomy_lib
    if category_names:
        full = taxonomy_lib.load(category_names)
    else:
        full = taxonomy_lib.from_frame(builtin_taxonomy_frame(), "built-in taxonomy")
    used = sample_categories(full, num_categories or min(40, full.num_classes), rng)
    if category_names:
        tf.io.gfile.copy(category_names, path, overwrite=True)
    else:
        sub = taxonomy_lib.from_frame(builtin_taxonomy_frame().iloc[np.sort(used)], "built-in")
        _write_text(path, sub.to_frame().to_csv(index=False))
    return full, used


def _write_bson_files(join, plans: dict[str, Plan], styles: list[CategoryStyle],
                      hard: Difficulty, seed: int, category_ids: np.ndarray, workers: int,
                      verbose: bool) -> tuple[dict, int, dict]:
    """Renders the products on ``workers`` processes into train.bson and test.bson;
    returns their sizes, the JPEG bytes written and each file's image keys (duplicates)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    sizes, seen, jpeg_bytes = {}, {name: [] for name in plans}, 0

    def documents(results, name):
        nonlocal jpeg_bytes
        for blob, n, images in results:
            jpeg_bytes += n
            seen[name].append(images)
            yield blob

    with multiprocessing.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(styles, hard)) as pool:
        for split, (name, plan) in enumerate(plans.items()):
            tasks = _tasks(plan, split, seed, category_ids, labeled=split == 0)
            bar = _progress(len(plan.product_ids), f"{name}", verbose)
            sizes[name] = _write_atomic(join(name),
                                        documents(pool.imap(_encode_chunk, tasks), name),
                                        lambda _: bar.update(min(_CHUNK, bar.total - bar.n)))
            bar.close()
        # Workers end on their sentinel: the `with`'s terminate() alone can hang for good
        # when an idle worker holds the task queue's lock as it is signalled (seen once in
        # a test run: a 40-product catalogue past 300 s).
        pool.close()
        pool.join()
    return sizes, jpeg_bytes, seen


def _write_label_files(join, train: Plan, test: Plan, category_ids: np.ndarray) -> None:
    """test_labels.csv (to score the test set) and sample_submission.csv (the most
    frequent training category for every test product, as Kaggle's)."""
    import pandas as pd
    _write_text(join("test_labels.csv"), pd.DataFrame(
        {"_id": test.product_ids, "category_id": category_ids[test.classes]}).to_csv(
            index=False))
    most_frequent = int(category_ids[np.bincount(train.classes,
                                                 minlength=len(category_ids)).argmax()])
    _write_text(join("sample_submission.csv"), pd.DataFrame(
        {"_id": test.product_ids, "category_id": most_frequent}).to_csv(index=False))


def replicate(source_dir: str, output_dir: str, copies: int) -> int:
    """A catalogue ``copies`` times larger, in seconds instead of hours: every training
    product of ``source_dir`` again ``copies`` times, with new ``_id``s and its rendered
    JPEGs reused byte for byte (test.bson and category_names.csv are copied).

    For measuring conversion at a size where start-up is amortised (`benchmarks`): the
    documents keep the real files' layout (``_id`` first, as BSON int32, then ``imgs``,
    ``category_id``), and only the 4 bytes of each ``_id`` are rewritten. Returns the
    number of training products written.
    """
    import tensorflow as tf
    from tfcdisc.catalogue import atomic, index as index_lib
    src = source_dir.rstrip("/") + "/train.bson"
    idx = index_lib.load_or_build(src)
    stride = int(idx.product_ids.max()) + 1
    if stride * copies >= 2**31:
        raise ValueError(f"{src}: _ids up to {stride - 1} times {copies} copies overflow int32")
    head = b"\x10_id\x00"
    ends = idx.offsets + idx.lengths
    groups = np.searchsorted(idx.offsets, np.arange(0, int(ends[-1]), 64 << 20))
    groups = [*groups.tolist(), len(idx)]
    with atomic.writing(output_dir.rstrip("/") + "/train.bson") as out, tf.io.gfile.GFile(
            src, "rb") as f:
        for k in range(copies):
            for at, last in zip(groups[:-1], groups[1:]):
                if last <= at:
                    continue
                base = int(idx.offsets[at])
                f.seek(base)
                buf = bytearray(f.read(int(ends[last - 1]) - base))
                for j in range(at, last):
                    o = int(idx.offsets[j]) - base
                    if buf[o + 4:o + 9] != head:
                        raise ValueError(f"{src}: byte offset {idx.offsets[j]}: _id is not "
                                         "the first element, as an int32")
                    buf[o + 9:o + 13] = (int(idx.product_ids[j]) + k * stride).to_bytes(
                        4, "little")
                out.write(bytes(buf))
    for name in ("test.bson", "category_names.csv"):
        tf.io.gfile.copy(source_dir.rstrip("/") + "/" + name,
                         output_dir.rstrip("/") + "/" + name, overwrite=True)
    return len(idx) * copies


def duplicate_rates(train: np.ndarray, test: np.ndarray) -> dict:
    """From (fingerprint, class) per image: how much of the catalogue is exact copies."""
    keys, inverse, counts = np.unique(train[:, 0], return_inverse=True, return_counts=True)
    pairs = np.unique(train[counts[inverse] > 1], axis=0)  # (image, class) among copies
    pair_keys, spread = np.unique(pairs[:, 0], return_counts=True)
    multi = pair_keys[spread > 1]  # images seen under more than one category
    return {
        # like the real train.bson's 38%: images whose bytes also occur elsewhere in it,
        # beyond the first occurrence
        "train_images_that_copy_another": round(1 - len(keys) / max(len(train), 1), 3),
        "train_images_with_a_copy_in_another_category": round(
            float(np.isin(train[:, 0], multi).mean()) if len(train) else 0.0, 3),
        "test_images_seen_in_train": round(
            float(np.isin(test[:, 0], keys).mean()) if len(test) else 0.0, 3),
    }


def _write_text(path: str, text: str) -> None:
    _write_atomic(path, [text.encode("utf-8")])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="product", disable=not enabled, file=sys.stderr,
                mininterval=1.0)
