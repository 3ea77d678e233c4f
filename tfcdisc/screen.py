"""The one image screen: what passes it decodes, in the build, in training and in predict.

Two steps. The JPEG header (`tfcdisc.jpeg.check`, microseconds) rejects bytes that are
not a JPEG and frames of the wrong size, or larger than allowed, before any pixel is
allocated. Then TensorFlow's own decoder, the one training, evaluation and prediction
use, decodes the image at 1/8 scale: every byte of the entropy-coded scan is still read
(that is where a garbled JPEG with intact headers fails), at about half the cost of a
full decode. So an image that passes cannot stop a run later.

Images are decoded many to a graph call; only a call that fails is redone one image at a
time, to name the bad ones. The build (`tfcdisc.examples`) screens every image it keeps;
predict and evaluate screen what they read from a BSON file (`tfcdisc.inference`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import tensorflow as tf

from tfcdisc import jpeg


@functools.cache
def _decodes():
    """A graph that decodes a vector of JPEGs (and fails if any one fails)."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_all(images):
        return tf.map_fn(lambda j: tf.size(tf.io.decode_jpeg(j, channels=3, ratio=8)),
                         images, fn_output_signature=tf.int32, parallel_iterations=1)

    return decode_all


def _decodable(data: bytes) -> jpeg.JpegError | None:
    try:
        tf.io.decode_jpeg(data, channels=3, ratio=8)
        return None
    except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError) as e:
        reason = e.message.splitlines()[0] if e.message else type(e).__name__
        return jpeg.JpegError("undecodable", f"JPEG that cannot be decoded ({reason})")


def screen(images: Sequence[bytes], size: tuple[int, int] | None = None,
           max_pixels: int | None = None) -> list[jpeg.JpegError | None]:
    """For each image, None if it is usable, else the `jpeg.JpegError` saying why.

    ``size`` (height, width) is required of every frame if given; ``max_pixels`` caps the
    frame a header may declare (checked before decoding).
    """
    problems: list[jpeg.JpegError | None] = [None] * len(images)
    pending = []
    for i, data in enumerate(images):
        try:
            jpeg.check(data, size, max_pixels)
            pending.append(i)
        except jpeg.JpegError as e:
            problems[i] = e
    if pending:
        try:
            _decodes()(tf.constant([images[i] for i in pending]))
        except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError):
            for i in pending:
                problems[i] = _decodable(images[i])
    return problems
