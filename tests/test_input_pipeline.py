"""The tf.data pipelines: static shapes, TensorFlow ops only, colour spaces, padding."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes
from tfcdisc import input_pipeline as ip


def _ops(dataset) -> set:
    """Every op in a dataset's graph, functions included."""
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    ops = {n.op for n in graph.node}
    for fn in graph.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def test_train_batches_are_static_and_tensorflow_only(dataset):
    options = ip.PipelineOptions(image_size=48, shuffle_buffer=64, seed=1)
    ds = ip.train_dataset(dataset, 16, options)
    images, labels = ds.element_spec
    assert images.shape == (16, 48, 48, 3) and images.dtype == tf.float32
    assert all(spec.shape == (16,) for spec in labels.values())
    ops = _ops(ds)
    assert "DecodeAndCropJpeg" in ops and "ExtractJpegShape" in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    x, y = next(iter(ds))
    assert x.shape == (16, 48, 48, 3) and 0 <= float(tf.reduce_min(x))
    assert float(tf.reduce_max(x)) <= 255.0 and y["label"].dtype == tf.int64


def test_one_training_example_per_image(dataset):
    images = dataset.info.metadata["build_stats"]["splits"]["train"]["images"]
    options = ip.PipelineOptions(image_size=32, shuffle_buffer=16)
    ds = ip.train_dataset(dataset, 1, options, repeat=False)
    assert sum(1 for _ in ds) == images


def test_deterministic_option_repeats_itself(dataset):
    options = ip.PipelineOptions(image_size=32, shuffle_buffer=64, seed=3, deterministic=True)
    a, b = (next(iter(ip.train_dataset(dataset, 8, options))) for _ in range(2))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


@pytest.mark.parametrize("mode,progressive", [("L", False), ("CMYK", False), ("RGB", True)])
def test_grayscale_cmyk_progressive_decode_to_rgb(mode, progressive):
    jpeg = tf.constant(jpeg_bytes(mode, progressive=progressive))
    assert ip.decode_train(jpeg, 64).shape == (64, 64, 3)
    assert ip.decode_train(jpeg, 64, seed=tf.constant([1, 2], tf.int64)).shape == (64, 64, 3)
    eval_image = ip.decode_eval(jpeg, 90)
    assert eval_image.shape == (90, 90, 3)
    if mode == "L":  # grey stays grey: the three channels are equal
        np.testing.assert_allclose(eval_image[..., 0], eval_image[..., 2])


def test_padding_and_masks():
    padded, mask = ip.pad_images(tf.constant([b"a", b"b"]))
    assert padded.numpy().tolist() == [b"a", b"b", b"", b""]
    assert mask.numpy().tolist() == [1, 1, 0, 0]
    padded, mask = ip.pad_images(tf.constant([b"1", b"2", b"3", b"4", b"5"]))
    assert padded.numpy().tolist() == [b"1", b"2", b"3", b"4"] and mask.numpy().sum() == 4


def test_product_batches_score_every_product(dataset):
    n = dataset.info.splits["validation"].num_examples
    ds = ip.product_dataset(dataset, "validation", 5, ip.PipelineOptions(image_size=32))
    features, labels = ds.element_spec
    assert features["images"].shape == (5, 4, 32, 32, 3) and features["mask"].shape == (5, 4)
    ids, valid, masks = [], 0, []
    for f, y in ds:
        ids += f["product_id"].numpy()[f["valid"].numpy() > 0].tolist()
        valid += int(f["valid"].numpy().sum())
        masks.append(f["mask"].numpy())
    expected = sorted(int(ex["product_id"]) for ex in dataset.as_dataset(
        split="validation").as_numpy_iterator())
    assert sorted(ids) == expected and valid == n and len(ids) == n
    assert len(masks) == -(-n // 5)  # the last batch was filled, not dropped
