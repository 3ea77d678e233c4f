"""The TFRecord layout of one product: defined here once, written by the build, parsed by
the input pipelines.

TFDS describes the same records with its FeaturesDict (`features`); its own serializer
writes these very bytes three times slower (`tests/prepare/test_tfds_build.py` checks that the
two agree), so the build writes with `serialize` and training parses with `parse_spec`,
all three derived from the names below.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfcdisc.catalogue import taxonomy as taxonomy_lib

IMAGES = "images"  # the product's JPEGs, bytes exactly as in the BSON
LABEL_KEYS = ("label", "label_level1", "label_level2")  # class indexes, -1 in the test split
INT_FEATURES = ("product_id", "num_images", *LABEL_KEYS)


def serialize(example: dict) -> bytes:
    """A product (a dict with `IMAGES` and `INT_FEATURES`) as a tf.train.Example."""
    feature, ints = tf.train.Feature, tf.train.Int64List
    fields = {k: feature(int64_list=ints(value=[example[k]])) for k in INT_FEATURES}
    fields[IMAGES] = feature(bytes_list=tf.train.BytesList(value=example[IMAGES]))
    return tf.train.Example(features=tf.train.Features(feature=fields)).SerializeToString()


def parse_spec(int_keys: tuple[str, ...] = LABEL_KEYS) -> dict:
    """`tf.io.parse_example` features for the images and ``int_keys``."""
    return {IMAGES: tf.io.RaggedFeature(tf.string),
            **{k: tf.io.FixedLenFeature([], tf.int64) for k in int_keys}}


def level2_label_names(taxonomy: taxonomy_lib.Taxonomy) -> list[str]:
    """Unique names of level-2 nodes: a name under two parents appears twice otherwise."""
    return [f"{taxonomy.level1_names[p]} / {n}"
            for n, p in zip(taxonomy.level2_names, taxonomy.level2_to_level1)]


def features(taxonomy: taxonomy_lib.Taxonomy | None,
             image_size: tuple[int, int] | None = (180, 180)) -> tfds.features.FeaturesDict:
    """The dataset's TFDS features. Without a taxonomy the ClassLabels get names later
    (`set_label_names`)."""
    shape = (*image_size, 3) if image_size else (None, None, 3)
    names = (None, None, None) if taxonomy is None else (
        [str(c) for c in taxonomy.category_ids], list(taxonomy.level1_names),
        level2_label_names(taxonomy))
    label, level1, level2 = LABEL_KEYS
    return tfds.features.FeaturesDict({
        "product_id": tfds.features.Scalar(np.int64, doc="The product's _id in the BSON."),
        IMAGES: tfds.features.Sequence(
            tfds.features.Image(shape=shape, encoding_format="jpeg"),
            doc="The product's JPEGs, bytes exactly as in the BSON (1-4 per product)."),
        "num_images": tfds.features.Scalar(np.int32, doc="len(images)"),
        label: tfds.features.ClassLabel(names=names[0], doc="category_id as a string; "
                                        "-1 in the test split"),
        level1: tfds.features.ClassLabel(names=names[1], doc="-1 in the test split"),
        level2: tfds.features.ClassLabel(names=names[2], doc="-1 in the test split"),
    })


def set_label_names(feature_dict: tfds.features.FeaturesDict,
                    taxonomy: taxonomy_lib.Taxonomy) -> None:
    """Names the ClassLabels of a dict made by `features(None)` once the CSV is read."""
    feature_dict["label"].names = [str(c) for c in taxonomy.category_ids]
    feature_dict["label_level1"].names = list(taxonomy.level1_names)
    feature_dict["label_level2"].names = level2_label_names(taxonomy)
