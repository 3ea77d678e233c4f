"""The tf.data pipelines: static shapes, TensorFlow ops only, colour spaces, padding."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import jpeg_bytes, product_batches
from tfcdisc.learn import input_pipeline as ip
from tfcdisc.prepare import metadata


def _ops(dataset) -> set:
    """Every op in a dataset's graph, functions included."""
    graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    ops = {n.op for n in graph.node}
    for fn in graph.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def test_train_batches_are_static_uint8_and_tensorflow_only(dataset):
    options = ip.PipelineOptions(image_size=48, decode_size=64, shuffle_buffer=64, seed=1)
    ds = ip.train_dataset(dataset, 16, options)
    images, labels, weights = ds.element_spec
    # uint8 at the decode size: the model crops and resizes on the device.
    assert images.shape == (16, 64, 64, 3) and images.dtype == tf.uint8
    assert all(spec.shape == (16,) and spec.dtype == tf.int32 for spec in labels.values())
    assert weights.shape == (16,) and weights.dtype == tf.float32
    ops = _ops(ds)
    assert "DecodeJpeg" in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless", "DecodeAndCropJpeg"}
    x, y, w = next(iter(ds))
    assert x.shape == (16, 64, 64, 3) and x.dtype == tf.uint8 and y["label"].dtype == tf.int32
    assert w.numpy().tolist() == [1.0] * 16


def test_a_resumed_pipeline_does_not_replay_epoch_0(dataset):
    options = ip.PipelineOptions(decode_size=32, shuffle_buffer=64, seed=3, deterministic=True)
    first = lambda step: next(iter(ip.train_dataset(dataset, 16, options, start_step=step)))  # noqa
    a, b, c = first(0), first(0), first(40)
    np.testing.assert_array_equal(a[1]["label"].numpy(), b[1]["label"].numpy())
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_one_training_example_per_image(dataset):
    images = metadata.read(dataset).images["train"]
    options = ip.PipelineOptions(decode_size=32, shuffle_buffer=16)
    ds = ip.train_dataset(dataset, 1, options, repeat=False)
    assert sum(1 for _ in ds) == images


@pytest.mark.parametrize("batch,group", [(128, 32), (100, 25), (24, 24), (7, 7), (127, 1)])
def test_whole_decode_groups_make_a_batch(batch, group):
    assert ip.decode_group(batch) == group and batch % group == 0


def test_batches_of_whole_groups_keep_every_image_with_its_labels(dataset):
    """A batch is made of whole decoded groups (no image-by-image rebatching): each image
    keeps its own labels and weight, and one pass yields every image but the remainder."""
    images = metadata.read(dataset).images["train"]
    options = ip.PipelineOptions(decode_size=32, shuffle_buffer=16, seed=0, deterministic=True)
    grouped = list(ip.train_dataset(dataset, 48, options, repeat=False))  # groups of 24
    assert len(grouped) == images // 48
    single = list(ip.train_dataset(dataset, 1, options, repeat=False))
    pixels = {x.numpy().tobytes(): int(y["label"][0]) for x, y, _ in single}
    for x, y, w in grouped:
        assert x.shape == (48, 32, 32, 3) and w.shape == (48,)
        for image, label in zip(x.numpy(), y["label"].numpy()):
            assert pixels[image[None].tobytes()] == label  # the image's own label


def test_deterministic_option_repeats_itself(dataset):
    options = ip.PipelineOptions(decode_size=32, shuffle_buffer=64, seed=3, deterministic=True)
    a, b = (next(iter(ip.train_dataset(dataset, 8, options))) for _ in range(2))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


@pytest.mark.parametrize("mode,progressive", [("L", False), ("CMYK", False), ("RGB", True)])
def test_grayscale_cmyk_progressive_decode_to_rgb(mode, progressive):
    jpeg = tf.constant(jpeg_bytes(mode, progressive=progressive))
    native = ip.decode_train(jpeg, 180)  # the catalogue's size: decoded, not resized
    np.testing.assert_array_equal(native, tf.io.decode_jpeg(jpeg, channels=3))
    assert ip.decode_train(jpeg, 64).shape == (64, 64, 3)
    eval_image = ip.decode_eval(jpeg, 90)
    assert eval_image.shape == (90, 90, 3) and eval_image.dtype == tf.uint8
    if mode == "L":  # grey stays grey: the three channels are equal
        np.testing.assert_allclose(eval_image[..., 0], eval_image[..., 2])


def test_padding_and_masks():
    padded = ip.pad_images(tf.constant([b"a", b"b"]))
    assert padded.numpy().tolist() == [b"a", b"b", b"", b""]
    assert ip.padding_mask(padded).numpy().tolist() == [1, 1, 0, 0]
    padded = ip.pad_images(tf.constant([b"1", b"2", b"3", b"4", b"5"]))
    assert padded.numpy().tolist() == [b"1", b"2", b"3", b"4"]


def test_product_batches_score_every_product(dataset):
    n = dataset.info.splits["validation"].num_examples
    ds = product_batches(dataset, "validation", 5, 32)
    spec = ds.element_spec
    assert spec["images"].shape == (5, 4, 32, 32, 3) and spec["images"].dtype == tf.uint8
    assert spec["mask"].shape == (5, 4) and spec["label"].dtype == tf.int32
    ids, valid, masks = [], 0, []
    for b in ds:
        ids += b["product_id"].numpy()[b["valid"].numpy() > 0].tolist()
        valid += int(b["valid"].numpy().sum())
        masks.append(b["mask"].numpy())
    expected = sorted(int(ex["product_id"]) for ex in dataset.as_dataset(
        split="validation").as_numpy_iterator())
    assert sorted(ids) == expected and valid == n and len(ids) == n
    assert len(masks) == -(-n // 5)  # the last batch was filled, not dropped


@pytest.mark.parametrize("n,pipelines,replicas", [(13, 1, 1), (13, 1, 2), (13, 2, 2),
                                                  (13, 3, 3), (4, 2, 4)])
def test_every_input_pipeline_makes_the_same_number_of_batches(n, pipelines, replicas):
    """Workers of a multi-worker run must step together: equal batch counts, each
    product exactly once across all of them."""
    products = tf.data.Dataset.range(n).map(
        lambda i: {"images": tf.fill([4], ""), "product_id": i})
    seen, counts = [], []
    for p in range(pipelines):
        ctx = tf.distribute.InputContext(pipelines, p, replicas)
        batches = list(ip.batch_products(products, 2 * replicas, 8, n, ctx))
        counts.append(len(batches))
        assert all(b["images"].shape[0] == 2 for b in batches)
        seen += [int(i) for b in batches for i, v in zip(b["product_id"], b["valid"]) if v]
    assert len(set(counts)) == 1 and counts[0] % (replicas // pipelines) == 0
    assert sorted(seen) == list(range(n))


def test_product_pipelines_free_their_iterator_at_once(dataset):
    """Freeing a product pipeline's iterator waited for tf.data's autotune thread (its
    sleep doubles from 10 ms to 60 s): predict sat 20, 41 or 82 s after its last batch.
    Every product pipeline (predict, evaluate, validation: `batch_products`) runs without
    autotuning, and an iterator kept for a while is freed in well under a second."""
    import time
    ds = product_batches(dataset, "validation", 4, 32)
    assert ds.options().autotune.enabled is False and ds.options().deterministic
    for _ in range(3):  # the iterator lives for several passes (autotune's sleep grows)
        it = iter(ds)
        for _ in it:
            pass
        start = time.perf_counter()
        del it
        assert time.perf_counter() - start < 1.0
