"""Training input and step speed on CPU.

    python -m benchmarks.run train

Targets (issue 9): the training input pipeline >= 0.9x the images/s of a bare
`tf.io.decode_jpeg` over the same bytes, side by side, with the 2017 Kaggle kernel's
locked Python generator as a second reference and the previous host-side crop pipeline
(float32 out) as the contender it replaces; bytes per step of uint8 against float32.
A training step fed by the real pipeline <= 1.05x the time of the same step fed from
in-memory tensors (issue 4). Also the CPU images/s of the demo model and EfficientNetV2-B0.
"""

from __future__ import annotations

import os
import pathlib
import sys

from benchmarks import common

_IMAGES = 12_000


def _dataset_dir() -> pathlib.Path:
    """The 100 MB synthetic catalogue built once with tfds build (cached)."""
    from benchmarks import bench_tfds
    folder = bench_tfds._folders()["100 MB"]
    out = common.CACHE / "tfds-100mb"
    if not list(out.glob("cdiscount/*/*/dataset_info.json")):
        common.log("building", out)
        common.run_stage("benchmarks.bench_train", "--stage", "build", "--folder", str(folder),
                         "--out", str(out))
    return out


def _host_crop(jpeg):
    """The input pipeline before issue 9: random resized crop decoded from the bytes,
    flip and resize on the host, float32 out (kept here as the contender it replaced)."""
    import tensorflow as tf
    shape = tf.image.extract_jpeg_shape(jpeg)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.5, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.random_flip_left_right(tf.image.resize(image, [180, 180]))
    return tf.ensure_shape(image, [180, 180, 3])


def _kaggle_generator(bson_path: str, batch: int):
    """The 2017 Kaggle kernel's feed: a Python generator over `bson.decode_file_iter`
    behind a lock, each image decoded with PIL into a float32 array, batches stacked
    in numpy (what Keras's fit_generator then consumed)."""
    import io
    import threading

    import bson
    import numpy as np
    from PIL import Image
    lock = threading.Lock()
    with open(bson_path, "rb") as f:
        docs = bson.decode_file_iter(f)
        while True:
            images = []
            with lock:
                while len(images) < batch:
                    d = next(docs)
                    for pic in d["imgs"]:
                        images.append(np.asarray(Image.open(io.BytesIO(pic["picture"])).convert(
                            "RGB"), np.float32) / 255.0)
            yield np.stack(images[:batch])


def _stage_input(data_dir: str, which: str, bson_path: str) -> dict:
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from tfcdisc.learn import input_pipeline as ip
    builder = ip.load_builder(data_dir)
    options = ip.PipelineOptions(image_size=180, decode_size=180, shuffle_buffer=8192)
    batch = 128
    if which == "pipeline":
        ds = iter(ip.train_dataset(builder, batch, options))
    elif which == "pipeline_before":  # before issue 25: decoded groups unbatched, rebatched
        records = ip._image_records(builder, "train", options, None).shuffle(8192).repeat()
        groups = ip.decode_failsafe(
            records.batch(32, drop_remainder=True).map(
                lambda jpeg, labels: {"images": jpeg, "labels": labels}),
            lambda j: ip.decode_train(j, 180), tf.TensorSpec([180, 180, 3], tf.uint8),
            deterministic=None, padded=False)
        ds = iter(groups.map(lambda x: (x["images"], x["labels"],
                                        tf.cast(x["decoded"], tf.float32))).unbatch()
                  .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    elif which == "host_crop":
        records = ip._image_records(builder, "train", options, None).shuffle(8192).repeat()
        ds = iter(records.map(lambda j, y: (_host_crop(j), y), num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    elif which == "kaggle":
        ds = _kaggle_generator(bson_path, batch)
    elif which == "stage_records":  # every stage before the decode, on one core's worth:
        # read, parse, flatten to images (unbatch) and shuffle, all single-threaded ones
        ds = iter(ip._image_records(builder, "train", options, None).shuffle(8192).repeat()
                  .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    elif which in ("stage_rebatch", "stage_groups"):  # the last stage alone, on decoded groups
        group = ip.decode_group(batch)
        one = {"images": tf.zeros([group, 180, 180, 3], tf.uint8),
               "labels": {k: tf.zeros([group], tf.int32) for k in ip.LABEL_KEYS},
               "decoded": tf.ones([group], tf.bool)}
        groups = tf.data.Dataset.from_tensors(one).repeat()
        if which == "stage_rebatch":  # before issue 25: image by image, one thread
            ds = groups.map(lambda x: (x["images"], x["labels"], tf.cast(x["decoded"],
                                                                          tf.float32))
                            ).unbatch().batch(batch, drop_remainder=True)
        else:
            ds = groups.batch(batch // group, drop_remainder=True).map(
                lambda x: (ip._merge_groups(x["images"]),
                           tf.nest.map_structure(ip._merge_groups, x["labels"]),
                           tf.cast(ip._merge_groups(x["decoded"]), tf.float32)))
        ds = iter(ds.prefetch(tf.data.AUTOTUNE))
    else:  # the same JPEG bytes, in memory, decoded with nothing else around it
        raw = builder.as_dataset(split="train", decoders={"images": tfds.decode.SkipDecoding()})
        jpegs = [j for ex in raw.take(_IMAGES).as_numpy_iterator() for j in ex["images"]]
        ds = iter(tf.data.Dataset.from_tensor_slices(jpegs[:_IMAGES]).repeat()
                  .map(lambda j: tf.io.decode_jpeg(j, channels=3),
                       num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    first = None
    for _ in range(10):  # warm-up: fill buffers, trace
        first = next(ds)
    images = first[0] if isinstance(first, tuple) else first
    steps = _IMAGES // batch * (10 if which in ("stage_rebatch", "stage_groups") else 1)
    with common.Timer() as t:
        for _ in range(steps):
            next(ds)
    return {"images_per_s": steps * batch / t.seconds,
            "bytes_per_image": int(images.dtype.size * images[0].shape.num_elements()
                                   if hasattr(images.dtype, "size") else images[0].nbytes),
            "dtype": str(getattr(images.dtype, "name", images.dtype))}


def _stage_step(data_dir: str, backbone: str, image_size: int, batch: int, feed: str,
                steps: int) -> dict:
    import keras
    import tensorflow as tf
    from tfcdisc.learn import input_pipeline as ip, training
    from tfcdisc.prepare import metadata
    builder = ip.load_builder(data_dir)
    info = metadata.read(builder, data_dir).model_info()
    cfg = training.TrainConfig(data_dir=data_dir, model_dir="", backbone=backbone,
                               image_size=image_size, global_batch_size=batch,
                               optimizer="adamw", learning_rate=1e-3, bn_momentum=0.9)
    model = training.build_and_compile(cfg, info, 1000, 100)
    options = ip.PipelineOptions(image_size=image_size, decode_size=180, shuffle_buffer=8192)
    ds = ip.train_dataset(builder, batch, options).map(
        lambda x, y, w: (x, {"label": y["label"]}, w))
    if feed == "memory":
        ds = tf.data.Dataset.from_tensors(next(iter(ds))).repeat()
    model.fit(ds, steps_per_epoch=5, epochs=1, verbose=0)  # trace and warm up
    timing = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, *a):
            self.t = common.Timer().__enter__()

        def on_epoch_end(self, *a):
            self.t.__exit__()
            timing.append(self.t.seconds)

    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[Clock()])
    return {"seconds_per_step": timing[0] / steps, "images_per_s": steps * batch / timing[0]}


def _v5e8_need(number: bool = False):
    """The largest host images/s a v5e-8 needs for a TPU flagfile, from the preflight
    table in RESULTS.md (`benchmarks.run preflight`)."""
    import re
    text = common.RESULTS.read_text() if common.RESULTS.exists() else ""
    needs = [float(m.group(1).replace(",", "")) for m in re.finditer(
        r"^\| \w+_tpu\.cfg \| v5e-8 \|(?:[^|]*\|){9}\s*([\d,]+)\s*\|", text, re.M)]
    if number:
        return max(needs) if needs else float("inf")
    return f"{max(needs):,.0f}" if needs else "(run `benchmarks.run preflight` first)"


def run() -> None:
    data_dir = str(_dataset_dir())
    from benchmarks import bench_tfds
    bson_path = str(bench_tfds._folders()["100 MB"] / "train.bson")
    common.warm(pathlib.Path(bson_path))
    r = {}
    contenders = ("decode_only", "pipeline", "pipeline_before", "host_crop", "kaggle",
                  "stage_records", "stage_rebatch", "stage_groups")
    for which in contenders * 2:  # interleaved, best of two
        res = common.run_stage(__name__, "--stage", "input", "--data_dir", data_dir,
                               "--which", which, "--folder", bson_path)
        r.setdefault(which, []).append(res)
        common.log(which, res)
    best = {w: max(r[w], key=lambda x: x["images_per_s"]) for w in contenders}
    for feed in ("memory", "pipeline"):
        r[("demo", feed)] = common.run_stage(
            __name__, "--stage", "step", "--data_dir", data_dir, "--backbone", "small_cnn",
            "--image_size", "64", "--batch", "128", "--feed", feed, "--steps", "40")
        common.log("demo step", feed, r[("demo", feed)])
    r["b0"] = common.run_stage(
        __name__, "--stage", "step", "--data_dir", data_dir, "--backbone", "efficientnetv2_b0",
        "--image_size", "180", "--batch", "32", "--feed", "memory", "--steps", "8")
    common.log("b0", r["b0"])
    decode = best["decode_only"]["images_per_s"]
    rate = {w: best[w]["images_per_s"] for w in contenders}
    mem, fed = r[("demo", "memory")], r[("demo", "pipeline")]
    step_mb = {w: best[w]["bytes_per_image"] * 1024 / 1e6 for w in ("pipeline", "host_crop")}
    md = f"""## Training input and steps (issues 4, 9 and 25)

`python -m benchmarks.run train` on {common.machine()}, CPU only, on the 100 MB synthetic
catalogue built with `tfds build` (its train.bson for the 2017 kernel). Batches of 128 images
at 180 px; each contender in its own process, all interleaved, best of two runs each.

{common.table(["contender (what the host does)", "images/s", "vs bare decode",
               "vs 2017 kernel", "out", "bytes per step of 1,024"], [
    ["bare `tf.io.decode_jpeg` over the same JPEG bytes in memory", f"{decode:,.0f}", "1.00x",
     f"{decode / rate['kaggle']:.1f}x", best["decode_only"]["dtype"], ""],
    ["**tfcdisc now**: read, shuffle, decode (uint8, no resize at 180 px), batch; crop, flip "
     "and resize run in the model on the accelerator",
     f"**{rate['pipeline']:,.0f}**", f"**{rate['pipeline'] / decode:.2f}x**",
     f"{rate['pipeline'] / rate['kaggle']:.1f}x", best["pipeline"]["dtype"],
     f"{step_mb['pipeline']:,.0f} MB"],
    ["before: read, shuffle, crop-decode, flip, resize on the host (float32)",
     f"{rate['host_crop']:,.0f}", f"{rate['host_crop'] / decode:.2f}x",
     f"{rate['host_crop'] / rate['kaggle']:.1f}x", best["host_crop"]["dtype"],
     f"{step_mb['host_crop']:,.0f} MB"],
    ["2017 Kaggle kernel: locked Python generator over `decode_file_iter`, PIL decode, float32",
     f"{rate['kaggle']:,.0f}", f"{rate['kaggle'] / decode:.2f}x", "1.0x",
     best["kaggle"]["dtype"], ""],
])}

Target (issue 25): the pipeline at >= 0.95x a bare decode: **{'met' if rate['pipeline'] / decode >= 0.95 else 'missed'}
({rate['pipeline'] / decode:.2f}x, best against best; the same pipeline with its former last
stage, decoded groups unbatched and rebatched image by image:
{rate['pipeline_before'] / decode:.2f}x)**; round by round, each pair run back to
back: {", ".join(f"{p['images_per_s'] / d['images_per_s']:.2f}x" for d, p in zip(r['decode_only'], r['pipeline']))}
(this machine's speed moves by a third between minutes). The host now only decodes; the random resized crop, the flip
and the resize to the model's size run on the accelerator as the model's first layer
(`models.ResizedCrop`, two small matrix products per image, which XLA compiles for TPUs),
so the host-side crop path ({rate['host_crop'] / decode:.2f}x) is gone. uint8 images cross the
host-to-device link at a quarter of float32's bytes: {step_mb['pipeline']:,.0f} MB instead of
{step_mb['host_crop']:,.0f} MB for a step of 1,024 images at 180 px.

The last stage alone, the one that runs on a single thread, fed decoded groups from memory
(its ceiling whatever the cores): batches of whole decoded groups and a reshape
**{rate['stage_groups']:,.0f} images/s**, against {rate['stage_rebatch']:,.0f} images/s for the
former unbatch and rebatch ({rate['stage_groups'] / rate['stage_rebatch']:.1f}x); every stage
before the decode together (reading, parsing, flattening to images, the shuffle buffer: JPEG
bytes, not pixels) {rate['stage_records']:,.0f} images/s. A v5e-8 host
must deliver {_v5e8_need()} images/s for the TPU flagfiles at 50% MFU (the preflight
table): the last stage is **{'above' if rate['stage_groups'] >= _v5e8_need(number=True) else 'below'}** it
(the former one **{'above' if rate['stage_rebatch'] >= _v5e8_need(number=True) else 'below'}**), the stages before the decode
**{'above' if rate['stage_records'] >= _v5e8_need(number=True) else 'below'}** it (measured on 2 cores: their parallel
parse has more cores there). The decode itself spreads over the host's cores (224 vCPUs on a
v5e-8 host), which this 2-core machine cannot show. On these 2 cores the decode bounds
everything, so the whole pipeline runs as fast with the former last stage (above).

{common.table(["measure", "value", "target"], [
    ["demo model (small_cnn, 64 px, batch 128) step fed from memory (ms)",
     f"{mem['seconds_per_step'] * 1000:.0f}", ""],
    ["same step fed by the real pipeline (ms)", f"{fed['seconds_per_step'] * 1000:.0f}", ""],
    ["pipeline-fed / memory-fed step time", f"{fed['seconds_per_step'] / mem['seconds_per_step']:.2f}x",
     "<= 1.05x"],
    ["demo model training images/s on CPU (crop on the CPU too)", f"{mem['images_per_s']:,.0f}", ""],
    ["EfficientNetV2-B0, 180 px, batch 32: training images/s on CPU",
     f"{r['b0']['images_per_s']:,.1f}", ""],
])}

On this CPU the model's crop runs on the same two cores as everything else; on a TPU or GPU
it is a few matrix products beside the backbone. The real catalogue's 12.4M images would take
{12.37e6 / r['b0']['images_per_s'] / 3600:,.0f} hours per epoch with EfficientNetV2-B0 on these
2 cores, which is why the real runs go to a TPU or GPUs.
"""
    common.write_section("train", md)
    print(md)


def _stage_build(a) -> None:
    import subprocess
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "tfds"), "build",
                    str(common.ROOT.parent / "tfds_builder" / "cdiscount"),
                    "--manual_dir", a.folder, "--data_dir", a.out], check=True,
                   capture_output=True)
    common.report({})


def main() -> None:
    common.stage_main(run, {
        "build": _stage_build,
        "input": lambda a: common.report(_stage_input(a.data_dir, a.which, a.folder)),
        "step": lambda a: common.report(_stage_step(a.data_dir, a.backbone, a.image_size,
                                                    a.batch, a.feed, a.steps))},
        strings=["data_dir", "which", "backbone", "feed", "folder", "out"],
        ints=["image_size", "batch", "steps"])


if __name__ == "__main__":
    main()
