"""Duplicate-image lookup: what the training split says about an image whose exact bytes
it has already seen.

About 38% of the real training images are byte-identical copies of another, and test
images recur too; the 2017 leaders looked them up (+0.3 to +0.5 points for one model).
Here an image's fingerprint (FarmHash64 of its JPEG bytes, `fingerprints`, a TensorFlow op
so that the build of the table, the input pipelines and the SavedModel agree) keys a
`Table` built from the labelled splits (an export's: train and validation, its weight chosen
on validation by the train split's table): per unique image, the category it was seen
with most often and that category's share of its sightings. At inference an image found
in the table has its model probabilities blended with the table's distribution
(`blend`), with a weight chosen on the validation split (`choose_weight`).

Where the lookup runs: on the host, in the input pipeline (`lookup_fn`), so the
accelerator only does arithmetic on two small per-image features (TPUs have no hash
tables); in the SavedModel, inside the graph. Size: 40 bytes a unique image in the export
(measured with a million keys: the table in the SavedModel's graph, plus
``assets/duplicates.npz`` for the pipeline), so about 0.3 GB for the real catalogue's
7.7M unique training images; building it holds 12 bytes per training image (about 150 MB
for 12.4M).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np
import tensorflow as tf
from keras import ops

_BUCKETS = 2**63 - 1  # fingerprints are FarmHash64 folded into non-negative int64
WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def fingerprints(images: tf.Tensor) -> tf.Tensor:
    """int64 fingerprints of JPEG byte strings, any shape (empty strings included)."""
    return tf.strings.to_hash_bucket_fast(images, _BUCKETS)


@dataclasses.dataclass
class Table:
    """Per unique training image: its fingerprint, top category (class index) and that
    category's share of the image's sightings; and the blend weight."""

    keys: np.ndarray  # int64, sorted
    top_class: np.ndarray  # int32
    share: np.ndarray  # float32: the top category's sightings over all of the image's
    weight: float = 0.0
    images: int = 0  # labelled images read to build it
    accuracy_by_weight: dict | None = None  # validation product accuracy, when chosen
    seen: np.ndarray | None = None  # int32: how often each image was seen, all categories

    def __len__(self) -> int:
        return len(self.keys)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        extra = {} if self.seen is None else {"seen": self.seen}
        np.savez(buf, keys=self.keys, top_class=self.top_class, share=self.share,
                 weight=np.float32(self.weight), images=np.int64(self.images), **extra)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Table":
        z = np.load(io.BytesIO(data))
        return cls(z["keys"], z["top_class"], z["share"], float(z["weight"]),
                   int(z["images"]), seen=z["seen"] if "seen" in z.files else None)


def sightings(images: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The (fingerprint, class index) of every image of a dataset of (jpeg, class index):
    12 bytes an image, so that several tables can be made from one read of a split."""
    hashes, classes = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
    for h, c in images.batch(8192).map(lambda j, c: (fingerprints(j), tf.cast(c, tf.int32)),
                                       num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
        hashes.append(h)
        classes.append(c)
    return np.concatenate(hashes), np.concatenate(classes)


def table_of(hashes: np.ndarray, classes: np.ndarray) -> Table:
    """The table of images' sightings (`sightings`: fingerprints and class indices)."""
    if not len(hashes):
        return Table(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                     seen=np.zeros(0, np.int32))
    order = np.lexsort((classes, hashes))
    h, c = hashes[order], classes[order]
    starts = np.flatnonzero(np.r_[True, (h[1:] != h[:-1]) | (c[1:] != c[:-1])])
    counts = np.diff(np.r_[starts, len(h)])
    ph, pc = h[starts], c[starts]
    # Pairs (image, class) ordered by image, then by count, most first: the first pair of
    # each image is its top class.
    order = np.lexsort((-counts, ph))
    ph, pc, counts = ph[order], pc[order], counts[order]
    first = np.flatnonzero(np.r_[True, ph[1:] != ph[:-1]])
    total = np.add.reduceat(counts, first)
    return Table(ph[first], pc[first].astype(np.int32),
                 (counts[first] / total).astype(np.float32), images=len(h),
                 seen=total.astype(np.int32))


def build(images: tf.data.Dataset) -> Table:
    """The table of a dataset of (jpeg, class index) per image."""
    return table_of(*sightings(images))


def static_table(table: Table) -> tf.lookup.StaticHashTable:
    """fingerprint -> row of the table, -1 when absent."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(table.keys, tf.int64),
                                            tf.range(len(table), dtype=tf.int64)),
        default_value=-1)


def features(lookup: tf.lookup.StaticHashTable, top_class: tf.Tensor, share: tf.Tensor,
             images: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per image slot: ``duplicate_class`` (int32, -1 when the image is not in the table
    or is padding) and ``duplicate_share`` (float32)."""
    row = lookup.lookup(fingerprints(images))
    found = (row >= 0) & (tf.strings.length(images) > 0)
    safe = tf.maximum(row, 0)
    return {"duplicate_class": tf.where(found, tf.gather(top_class, safe), -1),
            "duplicate_share": tf.where(found, tf.gather(share, safe), 0.0)}


def lookup_fn(table: Table):
    """A function adding `features` to a batch of products (``images`` [b, 4] strings),
    for tf.data: the table's tensors are made once."""
    lookup = static_table(table)
    top_class = tf.constant(table.top_class)
    share = tf.constant(table.share)
    return lambda batch: {**batch, **features(lookup, top_class, share, batch["images"])}


def blend(log_probs, duplicate_class, duplicate_share, weight):
    """Per-image log-probabilities [..., C] blended with the table's distribution where
    the image was found: log((1 - w) p + w q), q giving the top class its share and
    spreading the rest evenly. keras.ops arithmetic: it runs on any device and backend."""
    found = duplicate_class >= 0
    q = _table_distribution(duplicate_class, duplicate_share, log_probs.shape[-1])
    mixed = ops.log((1.0 - weight) * ops.exp(log_probs) + weight * q + 1e-30)
    return ops.where(found[..., None], mixed, log_probs)


def _table_distribution(duplicate_class, duplicate_share, classes: int):
    """q: the table's top class gets its share, the rest is spread evenly."""
    top = ops.one_hot(ops.maximum(duplicate_class, 0), classes, dtype="float32")
    share = ops.cast(duplicate_share, "float32")[..., None]
    others = float(max(classes - 1, 1))
    return top * share + (1.0 - top) * (1.0 - share) / others


def choose_weight(accuracy_by_weight: Sequence[float],
                  grid: Sequence[float] = WEIGHT_GRID) -> float:
    """The weight with the best validation accuracy; the smallest of equals (0: off)."""
    best = max(accuracy_by_weight)
    return float(grid[list(accuracy_by_weight).index(best)])
