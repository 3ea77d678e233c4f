"""tf.data input pipelines over the TFDS `cdiscount` dataset (local or gs://).

Only TensorFlow ops run per image (no py_function: TPUs cannot run it). Decoding JPEG
bytes into pixels happens in `decode_train` / `decode_eval` only, which training,
evaluation, export and prediction all use, so a colour-space fix is made once:
grayscale and CMYK JPEGs come out as RGB. The pipelines decode through `decode_failsafe`:
an image TensorFlow cannot decode (the build checks headers only) is masked and counted,
never an error that stops the run.

* Training: one example per image, with its product's labels. Files are shuffled and
  interleaved, products parsed in vectorised batches, images shuffled in a buffer,
  decoded whole to uint8 at the catalogue's size and batched with ``drop_remainder=True``
  for static shapes; the random crop, flip and resize run on the device, as the model's
  first layer (`models.ResizedCrop`).
* Evaluation and prediction: one example per product, its images padded to
  `MAX_IMAGES` with a mask, centre view; the last batch is filled with masked dummy
  products (``valid`` = 0) instead of being dropped, so every product is scored.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_datasets as tfds

from tfcdisc.catalogue import jpeg as jpeg_lib
from tfcdisc.learn import duplicates
from tfcdisc.prepare import metadata, records
from tfcdisc.prepare.records import LABEL_KEYS

MAX_IMAGES = 4
_DECODE_GROUP = 32  # training images decoded per call (one that fails: image by image)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Knobs of the input pipeline; the defaults are the fast ones.

    Attributes:
      image_size: side of the model input; evaluation images are resized to it here.
      decode_size: side of the uint8 training images (the catalogue's own 180: decoding
        is all the host does; the model crops and resizes on the accelerator).
      shuffle_buffer: training examples shuffled in memory (images, not products).
      deterministic: reproducible element order (slower with parallel maps).
      seed: for file order and shuffling.
      data_service: address of a tf.data service dispatcher to offload decoding.
    """

    image_size: int = 180
    decode_size: int = 180
    shuffle_buffer: int = 16384
    deterministic: bool = False
    seed: int | None = None
    data_service: str | None = None


# --------------------------------------------------------------------------- decoders


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def decode_train(jpeg: tf.Tensor, size: int) -> tf.Tensor:
    """A training image as uint8 RGB [size, size, 3]: a plain decode when the JPEG is
    already that size (the catalogue's 180x180), a resize otherwise. Crops, flips and
    the resize to the model's size happen on the accelerator (`models.ResizedCrop`)."""
    image = tf.io.decode_jpeg(jpeg, channels=3)
    shape = tf.shape(image)
    image = tf.cond(tf.logical_and(shape[0] == size, shape[1] == size),
                    lambda: image, lambda: _to_uint8(tf.image.resize(image, [size, size])))
    return tf.ensure_shape(image, [size, size, 3])


def decode_eval(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """The centre view as uint8 [image_size, image_size, 3]: the whole image, resized
    (rounded to whole grey levels); an empty string decodes to padding."""
    jpeg = tf.where(tf.strings.length(jpeg) > 0, jpeg, jpeg_lib.BLANK)
    image = tf.io.decode_jpeg(jpeg, channels=3)
    image = _to_uint8(tf.image.resize(image, [image_size, image_size]))
    return tf.ensure_shape(image, [image_size, image_size, 3])


def padding_mask(images: tf.Tensor) -> tf.Tensor:
    """1.0 for a real image, 0.0 for a padded slot (an empty string)."""
    return tf.cast(tf.strings.length(images) > 0, tf.float32)


def decode_products(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """[..., MAX_IMAGES] JPEG strings (empty = padding) -> uint8 [..., MAX_IMAGES, S, S, 3].

    One map over the real images of one product or of a whole batch (padded slots, about
    half of them, are zeros, never decoded: the mask leaves them out); the static shape
    of ``images`` is kept, so TPU batches stay static. Fails if any image fails: the
    pipelines decode through `decode_failsafe` instead.
    """
    return _decode_all(images, lambda j: decode_eval(j, image_size),
                       tf.TensorSpec([image_size, image_size, 3], tf.uint8))[0]


def _decode_all(images: tf.Tensor, decode_one, spec: tf.TensorSpec, one_by_one: bool = False,
                padded: bool = True, in_pipeline: bool = False
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """JPEG strings of any shape ("" = padding, left as zeros) -> (pixels, decoded bool).

    At once, a failing image fails the call; ``one_by_one``, each image is decoded in its
    own dataset element and a failing one is left out (zeros, decoded False). Without
    ``padded`` every string is taken for an image (an empty one fails the call).
    ``in_pipeline``: the call runs inside tf.data (a nested dataset may decode).
    """
    flat = tf.reshape(images, [-1])
    if not one_by_one and not padded and flat.shape[0] is not None and \
            flat.shape[0] <= _DECODE_GROUP:
        # A small static group of real images (training's): a graph of independent
        # decodes, which tf.data runs in parallel (1.2x a parallel map of one image per
        # element; `map_fn` 0.65x). Zeroing padding here would cost 2.4x the whole decode.
        decoded = tf.stack([decode_one(j) for j in tf.unstack(flat)])
        return _reshaped(decoded, images, spec), tf.ones_like(images, tf.bool)
    if not one_by_one and in_pipeline:
        # Any other batch (products' slots) in a tf.data pipeline: a parallel map over the
        # slots, padding left as zeros without a decode, batched whole: 1.4x a `map_fn`
        # over the real images and their scatter (benchmarks, "Predict's host side").
        # Not in a served graph, whose check admits no dataset op.
        slots = tf.data.Dataset.from_tensor_slices(flat).map(
            lambda j: _decode_slot(j, decode_one, spec, padded),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        none = tf.data.Dataset.from_tensors((tf.zeros([0, *spec.shape], spec.dtype),
                                             tf.zeros([0], tf.bool)))
        pixels, ok = slots.batch(tf.maximum(tf.shape(flat, tf.int64)[0], 1)).concatenate(
            none).take(1).get_single_element()
        return _reshaped(pixels, images, spec), _reshaped(ok, images)
    real = tf.where(tf.strings.length(flat) > 0)
    if one_by_one:
        each = tf.data.Dataset.from_tensor_slices((real, tf.gather_nd(flat, real))).map(
            lambda where, jpeg: (where, decode_one(jpeg))).ignore_errors()
        none = tf.data.Dataset.from_tensors((tf.zeros([0, 1], tf.int64),
                                             tf.zeros([0, *spec.shape], spec.dtype)))
        real, decoded = each.batch(tf.maximum(tf.shape(real, tf.int64)[0], 1)).concatenate(
            none).take(1).get_single_element()
    else:
        decoded = tf.map_fn(decode_one, tf.gather_nd(flat, real), parallel_iterations=16,
                            fn_output_signature=spec)
    count = tf.shape(flat, out_type=tf.int64)
    pixels = tf.scatter_nd(real, decoded, tf.concat([count, spec.shape], 0))
    ok = tf.scatter_nd(real, tf.ones(tf.shape(real)[:1], tf.int32), count) > 0
    return _reshaped(pixels, images, spec), _reshaped(ok, images)


def _decode_slot(jpeg: tf.Tensor, decode_one, spec: tf.TensorSpec, padded: bool):
    """One image slot ("" = padding when ``padded``) -> (pixels, decoded): a padded slot
    is zeros, its decode skipped (a cond)."""
    if not padded:
        return decode_one(jpeg), tf.constant(True)
    real = tf.strings.length(jpeg) > 0
    return tf.cond(real, lambda: decode_one(jpeg), lambda: tf.zeros(spec.shape, spec.dtype)), \
        real


def _reshaped(flat: tf.Tensor, like: tf.Tensor, spec: tf.TensorSpec | None = None):
    """``flat`` [N, *spec.shape] back to ``like``'s shape (static where it is static)."""
    inner = spec.shape if spec is not None else tf.TensorShape([])
    out = tf.reshape(flat, tf.concat([tf.shape(like), inner], 0))
    out.set_shape(like.shape.concatenate(inner))
    return out


def decode_failsafe(ds: tf.data.Dataset, decode_one, spec: tf.TensorSpec,
                    key: str = "images", deterministic: bool | None = True,
                    padded: bool = True) -> tf.data.Dataset:
    """Dict elements whose ``key`` holds JPEG strings ("" = padding) get it decoded (one
    ``spec`` per string) and ``decoded`` (bool, same shape: False for padding and for an
    image TensorFlow cannot decode). A failed decode never stops a run. ``padded=False``
    promises no padding (training's images), for the faster static decode of small groups.

    The build checks headers only (a full screen halved it); an image whose scan data is
    garbage fails here, at the decode that runs anyway. Each element is decoded at once;
    only an element that fails is decoded again one image at a time (tf.data runs the
    second attempt only when the first was dropped), so the good path costs nothing more.
    """
    def attempt(one_by_one):
        def fn(element):
            pixels, ok = _decode_all(element[key], decode_one, spec, one_by_one, padded,
                                     in_pipeline=True)
            return {**element, key: pixels, "decoded": ok}
        return fn

    def either(element):
        one = tf.data.Dataset.from_tensors(element)
        return one.map(attempt(False)).ignore_errors().concatenate(
            one.map(attempt(True))).take(1)

    return ds.interleave(either, cycle_length=tf.data.AUTOTUNE, block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def pad_images(images: tf.Tensor, max_images: int = MAX_IMAGES) -> tf.Tensor:
    """A product's variable-length JPEG list -> [max_images] strings, "" as padding.

    A product with more images than ``max_images`` keeps its first ones.
    """
    images = images[:max_images]
    padded = tf.concat([images, tf.fill([max_images - tf.shape(images)[0]], "")], axis=0)
    return tf.ensure_shape(padded, [max_images])


# --------------------------------------------------------------------------- datasets


def load_builder(data_dir: str, config: str | None = None) -> tfds.core.DatasetBuilder:
    """The prepared `cdiscount` dataset under ``data_dir`` (the --data_dir of `tfds
    build`, or the versioned folder itself), of the build config named ``config`` (the
    name given to `tfds build --config`; default: the only config there).

    A data dir holding several configs is never resolved silently: which one trains or
    is scored would otherwise depend on their names' order.

    Raises:
      FileNotFoundError: no prepared dataset there, or not of that config.
      ValueError: several configs and none named; the message lists them.
    """
    path = data_dir.rstrip("/")
    if tf.io.gfile.exists(path + "/dataset_info.json"):
        return tfds.builder_from_directory(path)
    found = sorted(tf.io.gfile.glob(path + "/cdiscount/*/*/dataset_info.json"))
    if not found:
        for depth, inside in ((1, "/*/*/dataset_info.json"), (2, "/*/dataset_info.json")):
            if tf.io.gfile.glob(path + inside):  # the dataset's own folder, or a config's
                parent = path.rsplit("/", depth)[0] if path.count("/") >= depth else "."
                raise FileNotFoundError(
                    f"--data_dir={data_dir} is inside the built dataset; give the folder "
                    f"the build wrote to: --data_dir={parent} (or a version folder, "
                    f"{tf.io.gfile.glob(path + inside)[0].rsplit('/', 1)[0]})")
        raise FileNotFoundError(
            f"{data_dir}: no prepared cdiscount dataset here; run `tfds build "
            f"tfds_builder/cdiscount --manual_dir KAGGLE_DIR --data_dir {data_dir}` first")
    by_config: dict[str, list[str]] = {}
    for info in found:  # .../cdiscount/CONFIG/VERSION/dataset_info.json
        folder = info.rsplit("/", 1)[0]
        by_config.setdefault(folder.rsplit("/", 2)[-2], []).append(folder)
    if config is None:
        if len(by_config) > 1:
            raise ValueError(
                f"{data_dir} holds {len(by_config)} builds of the dataset (configs "
                f"{', '.join(sorted(by_config))}); name one with --dataset_config=NAME")
        config = next(iter(by_config))
    if config not in by_config:
        raise FileNotFoundError(
            f"{data_dir}: no build of config {config!r} (it has "
            f"{', '.join(sorted(by_config))}); build it with `tfds build ... --config` or "
            "give the name of one that is there")
    versions = sorted(by_config[config], key=lambda f: tuple(
        int(p) for p in f.rsplit("/", 1)[-1].split(".") if p.isdigit()))
    return tfds.builder_from_directory(versions[-1])


def fingerprint(builder) -> dict:
    """What makes a built dataset the one a run learned: its taxonomy (as a digest) and
    split sizes. A data dir rebuilt from another catalogue with the same class count
    would otherwise give an export the new taxonomy's names, without a word."""
    return {"taxonomy_sha256": metadata.taxonomy_sha256(builder),
            "classes": builder.info.features["label"].num_classes,
            "splits": {name: split.num_examples
                       for name, split in sorted(builder.info.splits.items())}}


def _read(builder, split: str, shuffle: bool, options: PipelineOptions,
          input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=options.seed,
                                  interleave_cycle_length=16 if shuffle else 1,
                                  skip_prefetch=True)
    return builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                              decoders={"images": tfds.decode.SkipDecoding()})


_PARSE_SPEC = records.parse_spec()


def _labels(ex: dict, count=None) -> dict:
    """int32 labels: half the bytes of int64, and what the device computes with."""
    return {k: tf.cast(ex[k] if count is None else tf.repeat(ex[k], count), tf.int32)
            for k in LABEL_KEYS}


def _record_batches(builder, split: str, options: PipelineOptions,
                    input_context: tf.distribute.InputContext | None
                    ) -> tf.data.Dataset | None:
    """A split's products parsed a few hundred at a time (one vectorised parse_example
    instead of one parse per product: reading becomes ~8x cheaper), files shuffled and
    interleaved, this input pipeline's share; None for a format other than TFRecord."""
    files = [f"{builder.data_dir}/{name}" for name in builder.info.splits[split].filenames]
    if builder.info.file_format.value != "tfrecord":
        return None
    ds = tf.data.Dataset.from_tensor_slices(files)
    pipelines = input_context.num_input_pipelines if input_context is not None else 1
    by_file = pipelines > 1 and len(files) >= pipelines
    if by_file:  # each worker reads its own files
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    ds = ds.shuffle(len(files), seed=options.seed).interleave(
        tf.data.TFRecordDataset, cycle_length=min(16, len(files)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=options.deterministic)
    if pipelines > 1 and not by_file:  # fewer files than workers: every n-th product
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    return ds.batch(256).map(lambda records: tf.io.parse_example(records, _PARSE_SPEC),
                             num_parallel_calls=tf.data.AUTOTUNE)


def _image_records(builder, split: str, options: PipelineOptions,
                   input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """(jpeg, labels) per image, flattened from `_record_batches`."""
    batches = _record_batches(builder, split, options, input_context)
    if batches is None:  # other formats: TFDS's own reader
        ds = _read(builder, split, True, options, input_context)
        return ds.map(lambda ex: (ex["images"], _labels(ex, tf.shape(ex["images"])[0]))
                      ).unbatch()
    return batches.map(lambda ex: (ex["images"].flat_values,
                                   _labels(ex, ex["images"].row_lengths()))).unbatch()


def _product_records(builder, split: str, options: PipelineOptions,
                     input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
    """(jpegs [n], labels) per product, from `_record_batches`."""
    batches = _record_batches(builder, split, options, input_context)
    if batches is None:
        return _read(builder, split, True, options, input_context).map(
            lambda ex: (ex["images"], _labels(ex)))
    return batches.map(lambda ex: (ex["images"], _labels(ex))).unbatch()


def image_labels(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """(jpeg, class index) for every image of a split, in no particular order."""
    return _image_records(builder, split, PipelineOptions(seed=0), None).map(
        lambda jpeg, labels: (jpeg, labels["label"]), num_parallel_calls=tf.data.AUTOTUNE)


def _tf_options(options: PipelineOptions) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = options.deterministic
    opts.experimental_optimization.map_parallelization = True
    return opts


def train_dataset(builder: tfds.core.DatasetBuilder, batch_size: int,
                  options: PipelineOptions = PipelineOptions(), split: str = "train",
                  input_context: tf.distribute.InputContext | None = None,
                  repeat: bool = True, start_step: int = 0) -> tf.data.Dataset:
    """Batches of (uint8 images [B, D, D, 3], int32 {label, label_level1, label_level2},
    float32 weights [B]): weight 0 for an image TensorFlow cannot decode (zeros, left out of
    the loss and the metrics, counted by `models.UndecodableImages`), 1 otherwise.

    The host only reads, shuffles and decodes; the model crops on the accelerator.
    ``batch_size`` is global; with an ``input_context`` (from
    `strategy.distribute_datasets_from_function`) this pipeline reads its share of the
    files and makes per-replica batches. A run resumed at ``start_step`` draws its file
    order and shuffle from a seed moved on by that step, so it does not replay epoch 0.
    """
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    options = _from_step(options, start_step)
    ds = _image_records(builder, split, options, input_context)
    # Shuffle before repeat, so that every epoch sees every image once.
    ds = ds.shuffle(options.shuffle_buffer, seed=options.seed)
    if repeat:
        ds = ds.repeat()
    size, group = options.decode_size, decode_group(batch_size)
    # Static groups (drop_remainder even without repeat: what they leave out, fewer than a
    # group, a whole batch would have left out too, as the group divides the batch).
    ds = ds.batch(group, drop_remainder=True).map(
        lambda jpeg, labels: {"images": jpeg, "labels": labels})
    ds = decode_failsafe(ds, lambda j: decode_train(j, size),
                         tf.TensorSpec([size, size, 3], tf.uint8), deterministic=None,
                         padded=False)
    # Whole decoded groups make a batch: one copy per group and a free reshape (an
    # unbatch and rebatch copied image by image on one thread: 63k images/s against
    # 180k, under the 65k a v5e-8 host needs; benchmarks, "Training input").
    ds = ds.batch(batch_size // group, drop_remainder=True).map(
        lambda x: (_merge_groups(x["images"]), tf.nest.map_structure(_merge_groups,
                                                                      x["labels"]),
                   tf.cast(_merge_groups(x["decoded"]), tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE).with_options(_tf_options(options))
    if options.data_service:
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode="parallel_epochs", service=options.data_service))
    return ds.prefetch(tf.data.AUTOTUNE)


def products_per_batch(images: int, count: int, multiple: int = 1) -> int:
    """Products of ``count`` images in a batch of about ``images`` images: as many as fit,
    rounded down to a ``multiple`` (the devices a batch is split over), at least one
    multiple."""
    return max(images // count // multiple, 1) * multiple


def product_train_dataset(builder: tfds.core.DatasetBuilder, batch_size: int,
                          options: PipelineOptions = PipelineOptions(), split: str = "train",
                          input_context: tf.distribute.InputContext | None = None,
                          repeat: bool = True, start_step: int = 0,
                          multiple: int = 1) -> tf.data.Dataset:
    """Batches of whole products for a product phase (`models.product_model`):
    ({images: uint8 [P, n, D, D, 3], mask: [P, n]}, int32 labels [P], weights [P]).

    Every batch holds products of one image count n (`group_by_window`), P of them
    (`products_per_batch`: about ``batch_size`` images), so no slot is padding and each
    of the four shapes is static once compiled. ``mask`` is 0 for an image TensorFlow
    cannot decode, and a product with none gets weight 0 (counted by
    `models.UndecodableImages`). Products without images (the build counts them) have
    nothing to learn from and are not read. ``batch_size`` is global, or this input
    pipeline's with an ``input_context``.
    """
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    options = _from_step(options, start_step)
    ds = _product_records(builder, split, options, input_context).filter(
        lambda images, labels: tf.size(images) > 0)
    ds = ds.shuffle(max(options.shuffle_buffer // 2, 1), seed=options.seed)
    if repeat:
        ds = ds.repeat()
    sizes = tf.constant([products_per_batch(batch_size, n, multiple)
                         for n in range(1, MAX_IMAGES + 1)], tf.int64)

    def count(images, labels):
        return tf.cast(tf.minimum(tf.size(images), MAX_IMAGES) - 1, tf.int64)

    ds = ds.map(lambda images, labels: (images[:MAX_IMAGES], labels)).group_by_window(
        count, lambda n, window: window.batch(tf.gather(sizes, n), drop_remainder=True),
        window_size_func=lambda n: tf.gather(sizes, n))
    size = options.decode_size
    ds = decode_failsafe(ds.map(lambda images, labels: {"images": images, "labels": labels}),
                         lambda j: decode_train(j, size),
                         tf.TensorSpec([size, size, 3], tf.uint8), deterministic=None,
                         padded=False)

    def split_up(x):
        mask = tf.cast(x["decoded"], tf.float32)
        return {"images": x["images"], "mask": mask}, x["labels"], tf.reduce_max(mask, 1)

    ds = ds.map(split_up, num_parallel_calls=tf.data.AUTOTUNE).with_options(
        _tf_options(options))
    return ds.prefetch(tf.data.AUTOTUNE)


def _from_step(options: PipelineOptions, start_step: int) -> PipelineOptions:
    """A run resumed at ``start_step`` draws its file order and shuffle from a seed moved
    on by that step, so it does not replay epoch 0."""
    if start_step and options.seed is not None:
        return dataclasses.replace(options, seed=options.seed + 1_000_003 * start_step)
    return options


def decode_group(batch_size: int) -> int:
    """Training images decoded together: the largest divisor of the batch up to 32, so
    that whole groups make a batch."""
    return max(d for d in range(1, min(_DECODE_GROUP, batch_size) + 1) if batch_size % d == 0)


def _merge_groups(x: tf.Tensor) -> tf.Tensor:
    """[groups, group, ...] -> [groups * group, ...] (static: both are)."""
    return tf.reshape(x, [-1, *x.shape[2:]])


def split_products(builder: tfds.core.DatasetBuilder, split: str,
                   category_ids: bool = False) -> tf.data.Dataset:
    """A built split as padded product elements (see `batch_products`), in stored order.

    With ``category_ids``, ``category_id`` holds each product's category id (from the
    dataset's class names); -1 otherwise, and for an unlabelled split.
    """
    ds = _read(builder, split, False, PipelineOptions(), None)
    table = tf.constant([int(c) for c in builder.info.features["label"].names],
                        tf.int64) if category_ids else None

    def product(ex):
        out = {"images": pad_images(ex["images"]),
               "product_id": tf.cast(ex["product_id"], tf.int64), **_labels(ex)}
        out["category_id"] = tf.constant(-1, tf.int64)
        if table is not None:  # an unlabelled split stores label -1
            label = ex["label"]
            out["category_id"] = tf.where(label >= 0, tf.gather(table,
                                                                tf.maximum(label, 0)), -1)
        return out

    return ds.map(product, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def batch_products(products: tf.data.Dataset, batch_size: int, image_size: int,
                   num_products: int | None = None,
                   input_context: tf.distribute.InputContext | None = None,
                   duplicate_table=None) -> tf.data.Dataset:
    """Static batches of products for evaluation and prediction under any strategy.

    ``products`` yields dicts with ``images`` ([MAX_IMAGES] JPEG strings, "" as padding)
    and any other scalars (product_id, labels, ...). Batches add the decoded uint8
    ``images`` [b, 4, S, S, 3], ``mask`` [b, 4] (1.0 for an image decoded), ``undecodable``
    [b, 4] (1.0 for an image TensorFlow could not decode: masked, to be counted by the
    caller; `decode_failsafe`) and ``valid`` [b]. Every product appears
    exactly once: the last batch is filled with dummy products (``valid`` 0) instead of
    being dropped. ``batch_size`` is global; with an ``input_context`` each input
    pipeline reads every n-th product, and all pipelines make the same number of batches
    (collectives across workers must line up), each split into per-replica batches.
    With a ``duplicate_table`` (`tfcdisc.learn.duplicates.Table`) batches also carry each
    image's ``duplicate_class`` and ``duplicate_share``, looked up here on the host.
    """
    pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline = input_context.input_pipeline_id if input_context else 0
    if input_context is not None:
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        local = per_replica * (input_context.num_replicas_in_sync // pipelines)
    else:
        per_replica = local = batch_size
    if pipelines > 1:
        if num_products is None:
            raise ValueError("products of unknown number cannot be split across input "
                             "pipelines; give their number")
        products = products.shard(pipelines, pipeline)
    if num_products is not None:
        most = -(-num_products // pipelines)
        mine = num_products // pipelines + (1 if pipeline < num_products % pipelines else 0)
        filler = -(-most // local) * local - mine
    else:  # unknown length: one batch of dummies at most, the rest dropped by remainder
        filler = local - 1
    products = products.map(lambda p: {**p, "valid": tf.constant(1.0)})
    dummy = tf.nest.map_structure(
        lambda spec: tf.fill(spec.shape, "") if spec.dtype == tf.string else
        tf.zeros(spec.shape, spec.dtype) - (0 if spec.dtype == tf.float32 else 1),
        products.element_spec)
    dummy["valid"] = tf.constant(0.0)
    ds = products.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(filler))
    ds = ds.batch(local, drop_remainder=True)
    if per_replica != local:
        ds = ds.rebatch(per_replica, drop_remainder=True)

    lookup = duplicates.lookup_fn(duplicate_table) if duplicate_table is not None else None

    def prepare(batch):
        out = lookup(batch) if lookup else batch
        return {**out, "real": padding_mask(batch["images"])}

    def finish(batch):
        out = {k: v for k, v in batch.items() if k not in ("real", "decoded")}
        mask = tf.cast(batch["decoded"], tf.float32)
        return {**out, "mask": mask, "undecodable": batch["real"] - mask}

    ds = decode_failsafe(ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE),
                         lambda j: decode_eval(j, image_size),
                         tf.TensorSpec([image_size, image_size, 3], tf.uint8))
    return ds.map(finish).prefetch(tf.data.AUTOTUNE).with_options(product_options())


def product_options() -> tf.data.Options:
    """Options of every product pipeline (predict, evaluate, validation): file order, and
    no autotuning. Freeing an iterator waits for tf.data's autotune thread, whose sleep
    doubles from 10 ms to 60 s: predict sat up to 82 s after its last batch. Without it
    AUTOTUNE means one parallel call per core, a fixed prefetch buffer grown on demand."""
    opts = tf.data.Options()
    opts.deterministic = True  # predictions come back in file order
    opts.autotune.enabled = False
    return opts
