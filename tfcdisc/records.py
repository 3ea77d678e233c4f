"""The TFRecord layout of one product: defined here once, written by the build, parsed by
the input pipelines.

TFDS describes the same records with its FeaturesDict (`tfcdisc.examples.features`); its
own serializer writes these very bytes three times slower (`tests/test_tfds_build.py`
checks that the two agree), so the build writes with `serialize` and training parses with
`parse_spec`, both derived from the names below.
"""

from __future__ import annotations

import tensorflow as tf

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
