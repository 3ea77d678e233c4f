"""tf.data input pipelines over the TFDS `cdiscount` dataset (local or gs://).

Only TensorFlow ops run per image (no py_function: TPUs cannot run it). Decoding JPEG
bytes into pixels happens in `decode_train` / `decode_eval` only, which training,
evaluation, export and prediction all use, so a colour-space fix is made once:
grayscale and CMYK JPEGs come out as RGB.

* Training: one example per image, with its product's labels. Files are shuffled and
  interleaved, products parsed in vectorised batches, images shuffled in a buffer, the crop is taken from the JPEG bytes
  (`decode_and_crop_jpeg`, no pixel outside the crop is decoded), flipped, resized,
  batched with ``drop_remainder=True`` for static shapes.
* Evaluation and prediction: one example per product, its images padded to
  `MAX_IMAGES` with a mask, centre view; the last batch is filled with masked dummy
  products (``valid`` = 0) instead of being dropped, so every product is scored.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds

MAX_IMAGES = 4
LABEL_KEYS = ("label", "label_level1", "label_level2")
# A 1x1 grey JPEG decoded in place of padding, so padded slots cost almost nothing.
_BLANK_JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300100b0c0e0c0a100e0d0e1211101318281a"
    "181616183123251d283a333d3c3933383740485c4e404457453738506d51575f626768673e4d71797064"
    "785c656763ffdb0043011112121815182f1a1a2f63423842636363636363636363636363636363636363"
    "6363636363636363636363636363636363636363636363636363636363636363ffc00011080001000103"
    "012200021101031101ffc4001f0000010501010101010100000000000000000102030405060708090a0b"
    "ffc400b5100002010303020403050504040000017d010203000411051221314106135161072271143281"
    "91a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748"
    "494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596979899"
    "9aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5"
    "e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffc4001f0100030101010101010101010000000000000102030405"
    "060708090a0bffc400b51100020102040403040705040400010277000102031104052131061241510761"
    "711322328108144291a1b1c109233352f0156272d10a162434e125f11718191a262728292a3536373839"
    "3a434445464748494a535455565758595a636465666768696a737475767778797a82838485868788898a"
    "92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7"
    "d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f0028a28a00ffd9")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the input pipeline; the defaults are the fast ones.

    Attributes:
      image_size: side of the square model input.
      shuffle_buffer: training examples shuffled in memory (images, not products).
      deterministic: reproducible element order (slower with parallel maps).
      crop_area: range of the fraction of the image a training crop covers.
      seed: for file order, shuffling and crops when ``deterministic``.
      data_service: address of a tf.data service dispatcher to offload decoding.
    """

    image_size: int = 180
    shuffle_buffer: int = 16384
    deterministic: bool = False
    crop_area: tuple[float, float] = (0.5, 1.0)
    seed: int | None = None
    data_service: str | None = None


# --------------------------------------------------------------------------- decoders


def decode_train(jpeg: tf.Tensor, image_size: int,
                 crop_area: tuple[float, float] = (0.5, 1.0),
                 seed: tf.Tensor | None = None) -> tf.Tensor:
    """Random crop decoded straight from the JPEG bytes, random flip, resize.

    Returns float32 RGB in [0, 255] of shape [image_size, image_size, 3]; the model
    applies its backbone's own scaling.
    """
    shape = tf.image.extract_jpeg_shape(jpeg)
    # Sample a box covering crop_area of the image with a near-square aspect ratio.
    kwargs = dict(bounding_boxes=tf.zeros([1, 0, 4]), min_object_covered=0.0,
                  aspect_ratio_range=(3 / 4, 4 / 3), area_range=crop_area,
                  max_attempts=10, use_image_if_no_bounding_boxes=True)
    if seed is None:
        begin, size, _ = tf.image.sample_distorted_bounding_box(shape, **kwargs)
    else:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, seed=seed, **kwargs)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size])
    if seed is None:
        image = tf.image.random_flip_left_right(image)
    else:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def decode_eval(jpeg: tf.Tensor, image_size: int, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """The centre view: the whole image, resized; an empty string decodes to padding.

    ``tf.uint8`` rounds the resized pixels: a quarter of the memory for batches that
    travel (prediction), at a difference of under half a grey level.
    """
    jpeg = tf.where(tf.strings.length(jpeg) > 0, jpeg, _BLANK_JPEG)
    image = tf.io.decode_jpeg(jpeg, channels=3)
    image = tf.image.resize(image, [image_size, image_size])
    if dtype == tf.uint8:
        image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    return tf.ensure_shape(image, [image_size, image_size, 3])


def padding_mask(images: tf.Tensor) -> tf.Tensor:
    """1.0 for a real image, 0.0 for a padded slot (an empty string)."""
    return tf.cast(tf.strings.length(images) > 0, tf.float32)


def decode_products(images: tf.Tensor, image_size: int, dtype: tf.DType = tf.float32
                    ) -> tf.Tensor:
    """[..., MAX_IMAGES] JPEG strings (empty = padding) -> [..., MAX_IMAGES, S, S, 3].

    One map over every image of one product or of a whole batch; the static shape of
    ``images`` is kept, so TPU batches stay static.
    """
    flat = tf.map_fn(lambda j: decode_eval(j, image_size, dtype), tf.reshape(images, [-1]),
                     parallel_iterations=16,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], dtype))
    pixels = tf.reshape(flat, tf.concat([tf.shape(images), [image_size, image_size, 3]], 0))
    pixels.set_shape(images.shape.concatenate([image_size, image_size, 3]))
    return pixels


def pad_images(images: tf.Tensor, max_images: int = MAX_IMAGES) -> tuple[tf.Tensor, tf.Tensor]:
    """A product's variable-length JPEG list -> ([max_images] strings, [max_images] mask).

    A product with more images than ``max_images`` keeps its first ones.
    """
    images = images[:max_images]
    n = tf.shape(images)[0]
    padded = tf.concat([images, tf.fill([max_images - n], "")], axis=0)
    mask = tf.cast(tf.range(max_images) < n, tf.float32)
    return tf.ensure_shape(padded, [max_images]), mask


# --------------------------------------------------------------------------- datasets


def load_builder(data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared `cdiscount` dataset under ``data_dir`` (the --data_dir of `tfds
    build`, or the versioned folder itself)."""
    path = data_dir.rstrip("/")
    if not tf.io.gfile.exists(path + "/dataset_info.json"):
        found = sorted(tf.io.gfile.glob(path + "/cdiscount/*/*/dataset_info.json"))
        if not found:
            raise FileNotFoundError(
                f"{data_dir}: no prepared cdiscount dataset here; run `tfds build "
                f"tfds_builder/cdiscount --manual_dir KAGGLE_DIR --data_dir {data_dir}` first")
        path = found[-1].rsplit("/", 1)[0]
    return tfds.builder_from_directory(path)


def _read(builder, split: str, shuffle: bool, options: PipelineOptions,
          input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=options.seed,
                                  interleave_cycle_length=16 if shuffle else 1,
                                  skip_prefetch=True)
    return builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                              decoders={"images": tfds.decode.SkipDecoding()})


# How `tfcdisc.examples.serialize` lays out a product (checked by the tests).
_PARSE_SPEC = {"images": tf.io.RaggedFeature(tf.string),
               **{k: tf.io.FixedLenFeature([], tf.int64) for k in LABEL_KEYS}}


def _image_records(builder, split: str, options: PipelineOptions,
                   input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """(jpeg, labels) per image: files shuffled and interleaved, products parsed a few
    hundred at a time (one vectorised parse_example instead of one parse per product:
    reading becomes ~8x cheaper), then flattened to one element per image."""
    files = [f"{builder.data_dir}/{name}" for name in builder.info.splits[split].filenames]
    if builder.info.file_format.value != "tfrecord":  # other formats: TFDS's own reader
        ds = _read(builder, split, True, options, input_context)
        return ds.map(lambda ex: (ex["images"], {k: tf.fill([tf.shape(ex["images"])[0]], ex[k])
                                                 for k in LABEL_KEYS})).unbatch()
    ds = tf.data.Dataset.from_tensor_slices(files)
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    ds = ds.shuffle(len(files), seed=options.seed).interleave(
        tf.data.TFRecordDataset, cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)

    def flatten(records):
        ex = tf.io.parse_example(records, _PARSE_SPEC)
        counts = ex["images"].row_lengths()
        return ex["images"].flat_values, {k: tf.repeat(ex[k], counts) for k in LABEL_KEYS}

    return ds.batch(256).map(flatten, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _tf_options(options: PipelineOptions) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = options.deterministic
    opts.experimental_optimization.map_parallelization = True
    return opts


def train_dataset(builder: tfds.core.DatasetBuilder, batch_size: int,
                  options: PipelineOptions = PipelineOptions(), split: str = "train",
                  input_context: tf.distribute.InputContext | None = None,
                  repeat: bool = True) -> tf.data.Dataset:
    """Batches of (images [B, S, S, 3] float32, {label, label_level1, label_level2}).

    ``batch_size`` is global; with an ``input_context`` (from
    `strategy.distribute_datasets_from_function`) this pipeline reads its share of the
    files and makes per-replica batches.
    """
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = _image_records(builder, split, options, input_context)
    # Shuffle before repeat, so that every epoch sees every image once.
    ds = ds.shuffle(options.shuffle_buffer, seed=options.seed)
    if repeat:
        ds = ds.repeat()
    if options.deterministic and options.seed is not None:
        ds = ds.enumerate().map(
            lambda i, x: (tf.stack([tf.cast(options.seed, tf.int64), i]), x))

        def decode(seed, x):
            return decode_train(x[0], options.image_size, options.crop_area, seed), x[1]
    else:
        def decode(jpeg, labels):
            return decode_train(jpeg, options.image_size, options.crop_area), labels
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).with_options(_tf_options(options))
    if options.data_service:
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode="parallel_epochs", service=options.data_service))
    return ds.prefetch(tf.data.AUTOTUNE)


def product_dataset(builder: tfds.core.DatasetBuilder, split: str, batch_size: int,
                    options: PipelineOptions = PipelineOptions(),
                    input_context: tf.distribute.InputContext | None = None
                    ) -> tf.data.Dataset:
    """Batches of ({images [B, 4, S, S, 3], mask [B, 4], valid [B], product_id [B]}, labels).

    Every product appears exactly once; the last batch is filled with dummy products
    whose ``valid`` is 0, so shapes stay static and nothing is dropped.
    """
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = _read(builder, split, False, options, input_context)
    return batch_products(ds, batch_size, options.image_size,
                          num_products=None if input_context else
                          builder.info.splits[split].num_examples)


def batch_products(ds: tf.data.Dataset, batch_size: int, image_size: int,
                   num_products: int | None = None) -> tf.data.Dataset:
    """Pads, decodes and batches a dataset of product dicts (``images`` as JPEG strings,
    ``product_id``, optional labels); see `product_dataset`."""

    def parse(ex):
        padded, mask = pad_images(ex["images"])
        features = {"images": padded, "mask": mask, "valid": tf.constant(1.0),
                    "product_id": tf.cast(ex["product_id"], tf.int64)}
        labels = {k: tf.cast(ex.get(k, tf.constant(-1, tf.int64)), tf.int64)
                  for k in LABEL_KEYS}
        return features, labels

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    if num_products is not None:
        filler = (-num_products) % batch_size
    else:  # unknown length: pad with one full batch of dummies, dropped by remainder
        filler = batch_size - 1
    dummy = ({"images": tf.fill([MAX_IMAGES], ""), "mask": tf.zeros([MAX_IMAGES]),
              "valid": tf.constant(0.0), "product_id": tf.constant(-1, tf.int64)},
             {k: tf.constant(-1, tf.int64) for k in LABEL_KEYS})
    ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(filler))

    def decode(features, labels):
        features = dict(features, images=decode_products(features["images"], image_size))
        return features, labels

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    opts = tf.data.Options()
    opts.deterministic = True  # predictions come back in file order
    return ds.batch(batch_size, drop_remainder=True).with_options(opts).prefetch(
        tf.data.AUTOTUNE)
