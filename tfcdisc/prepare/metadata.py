"""The built dataset's metadata: what the builder records beside its records, and the one
reader of it.

The builder writes four keys into TFDS's ``info.metadata`` (`record_plan` before the
shards, `record_stats` after them); training, export, inference and the gallery read
them back through `read`, which names the data dir and the rebuild when one is missing.
`records` owns the layout of an example, `serve.export_format` the export's metadata:
this module owns the dataset's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from tfcdisc.catalogue import taxonomy as taxonomy_lib

TAXONOMY = "taxonomy"  # Taxonomy.to_dict(): category ids and their three levels of names
CLASS_COUNTS = "class_counts"  # products per class in the train split
BUILD_OPTIONS = "build_options"  # BuildOptions.metadata(): image_size, splits, bad data
BUILD_STATS = "build_stats"  # shards.collect_stats(): products, images, what was dropped
KEYS = (TAXONOMY, CLASS_COUNTS, BUILD_OPTIONS, BUILD_STATS)


def record_plan(info: Any, taxonomy: taxonomy_lib.Taxonomy, class_counts: np.ndarray,
                build_options: dict) -> None:
    """What the build knows once it has planned (into a builder's ``info``, whose
    metadata TFDS writes with the dataset): before any shard."""
    metadata = info.metadata
    metadata[TAXONOMY] = taxonomy.to_dict()
    metadata[CLASS_COUNTS] = np.asarray(class_counts).tolist()
    metadata[BUILD_OPTIONS] = build_options


def record_stats(info: Any, stats: dict) -> None:
    """What the build wrote, counted by split (and what it skipped): after the shards."""
    info.metadata[BUILD_STATS] = stats


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What a built dataset says about itself, read once."""

    data_dir: str
    taxonomy: taxonomy_lib.Taxonomy
    class_counts: np.ndarray  # products per class, train split (empty: not recorded)
    image_size: tuple[int, int] | None  # the build's largest image, (height, width)
    images: dict[str, int]  # images per split
    products: dict[str, int]  # products (examples) per split
    build_stats: dict
    taxonomy_sha256: str  # a digest of the taxonomy as recorded (`fingerprint`)

    @property
    def num_classes(self) -> int:
        return self.taxonomy.num_classes

    @property
    def fallback_class(self) -> int:
        """The class of a product with no image to score: the commonest in train (0 when
        the build recorded no counts)."""
        return int(np.argmax(self.class_counts)) if self.class_counts.size else 0

    @property
    def train_images(self) -> int:
        return self.images.get("train") or self.products.get("train", 0)

    def model_info(self) -> dict:
        """The class counts a model is built for, and what a run's schedule needs."""
        return {"num_classes": self.num_classes, "num_level1": self.taxonomy.num_level1,
                "num_level2": self.taxonomy.num_level2, "train_images": self.train_images,
                "fallback_class": self.fallback_class}


def read(builder: Any, data_dir: str | None = None) -> DatasetFacts:
    """The facts of a built dataset (a TFDS builder read from its folder).

    Raises:
      ValueError: the metadata lacks the taxonomy (a build by another version, or one
        that stopped before it planned), naming the data dir and the rebuild.
    """
    data_dir = data_dir or str(getattr(builder, "data_dir", "") or "the dataset")
    meta = builder.info.metadata or {}
    if TAXONOMY not in meta:
        raise ValueError(
            f"{data_dir}: the dataset's metadata has no {TAXONOMY!r}; it was built by "
            "another version of tfds_builder/cdiscount, or not to the end: rebuild it "
            "(python -m tfcdisc.build --manual_dir=KAGGLE_FOLDER --data_dir=... --overwrite)")
    taxonomy = taxonomy_lib.Taxonomy.from_dict(meta[TAXONOMY])
    counts = np.asarray(meta.get(CLASS_COUNTS) or [], np.int64)
    if counts.size not in (0, taxonomy.num_classes):
        raise ValueError(f"{data_dir}: the metadata's {CLASS_COUNTS} has {counts.size} "
                         f"classes, its taxonomy {taxonomy.num_classes}: rebuild it")
    size = (meta.get(BUILD_OPTIONS) or {}).get("image_size")
    stats = meta.get(BUILD_STATS) or {}
    return DatasetFacts(
        data_dir=data_dir, taxonomy=taxonomy, class_counts=counts,
        image_size=tuple(size) if size else None,
        images={name: int(s.get("images", 0)) for name, s in stats.get("splits", {}).items()},
        products={name: s.num_examples for name, s in builder.info.splits.items()},
        build_stats=stats, taxonomy_sha256=taxonomy_sha256(builder))


def taxonomy_sha256(builder: Any) -> str:
    """A short digest of the taxonomy as recorded: two builds of other catalogues with
    the same class count differ here (runs keep it: `input_pipeline.fingerprint`)."""
    taxonomy = (builder.info.metadata or {}).get(TAXONOMY)
    return hashlib.sha256(json.dumps(taxonomy, sort_keys=True).encode()).hexdigest()[:16]
