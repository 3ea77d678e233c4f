"""The image screen: what may enter the build and the pipelines, and why not.

Two steps. The JPEG header (`tfcdisc.catalogue.jpeg.check`, microseconds) rejects bytes that are
not a JPEG and frames of the wrong size, or larger than allowed, before any pixel is
allocated: the build and predict's reader run it on every image. Then, only where asked
(the build's ``decode_images``, and a product with more images than the model's slots),
TensorFlow's own decoder decodes the image at 1/8 scale: every byte of the entropy-coded
scan is still read (that is where a garbled JPEG with intact headers fails), at about half
the cost of a full decode and more than the rest of the build. By default the pipelines'
own decode catches such an image instead, at no extra cost
(`tfcdisc.learn.input_pipeline.decode_failsafe`).

Images are decoded `_GROUP` to a graph call, in a graph of that many independent decode
ops (a `map_fn` loop costs half as much again); only a call that fails is redone one
image at a time, to name the bad ones.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Iterable, Iterator, Sequence

import tensorflow as tf

from tfcdisc.catalogue import jpeg

_GROUP = 64  # images per graph call; a short last group is padded with a 1x1 JPEG


@functools.cache
def _decodes():
    """A graph decoding `_GROUP` JPEGs (and failing if any one fails)."""

    @tf.function(input_signature=[tf.TensorSpec([_GROUP], tf.string)])
    def decode_group(images):
        return tf.stack([tf.size(tf.io.decode_jpeg(j, channels=3, ratio=8))
                         for j in tf.unstack(images, num=_GROUP)])

    return decode_group


def _decodable(data: bytes) -> jpeg.JpegError | None:
    try:
        tf.io.decode_jpeg(data, channels=3, ratio=8)
        return None
    except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError) as e:
        reason = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", e.message or "").strip()
        return jpeg.JpegError("undecodable", "JPEG that cannot be decoded ("
                              f"{reason.splitlines()[0] if reason else type(e).__name__})")


def screen(images: Sequence[bytes], size: tuple[int, int] | None = None,
           max_pixels: int | None = None, decode: bool = True
           ) -> list[jpeg.JpegError | None]:
    """For each image, None if it is usable, else the `jpeg.JpegError` saying why.

    ``size`` (height, width) is required of every frame if given; ``max_pixels`` caps the
    frame a header may declare (checked before decoding). ``decode=False`` checks headers
    only: faster, but a garbled scan then passes.
    """
    problems: list[jpeg.JpegError | None] = [None] * len(images)
    pending = []
    for i, data in enumerate(images):
        try:
            jpeg.check(data, size, max_pixels)
            pending.append(i)
        except jpeg.JpegError as e:
            problems[i] = e
    for start in range(0, len(pending) if decode else 0, _GROUP):
        group = pending[start:start + _GROUP]
        batch = [images[i] for i in group] + [jpeg.BLANK] * (_GROUP - len(group))
        try:
            _decodes()(tf.constant(batch))
        except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError):
            for i in group:
                problems[i] = _decodable(images[i])
    return problems


def screen_products(products: Iterable, chunk: int, **options
                    ) -> Iterator[list[tuple[object, list[jpeg.JpegError | None]]]]:
    """Products (anything with ``images``) ``chunk`` at a time, each with its images'
    verdicts (`screen` with ``options``): one decode call covers a chunk's images. What
    the build and predict's reader share."""
    products = iter(products)
    while batch := list(itertools.islice(products, chunk)):
        verdicts = iter(screen([data for p in batch for data in p.images], **options))
        yield [(p, [next(verdicts) for _ in p.images]) for p in batch]
