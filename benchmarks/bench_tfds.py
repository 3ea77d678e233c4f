"""Dataset build: `tfds build` against the published Kaggle-kernel conversion.

    python -m benchmarks.run tfds

Target (issue 12): the whole command >= 10x the Kaggle-kernel way, side by side in one
run on a catalogue of >= 500,000 products (start-up amortised), per process and per
core; beside it the machine's sequential read speed for the same bytes, cold and warm;
memory per worker. Beam's DirectRunner is measured too: it is the path to Dataflow, not
the fast local path.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile

from benchmarks import common

_BEAM = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"
_HEADERS_ONLY = '{"name": "headers", "decode_images": false}'


def kaggle_kernel(folder: str, out: str, limit: int) -> dict:
    """What published kernels did: decode every document and every JPEG (to read its
    size), one tf.train.Example per image, ZLIB-compressed TFRecord."""
    import bson
    import numpy as np
    import tensorflow as tf
    from PIL import Image
    feature = tf.train.Feature
    n = 0
    with common.Timer() as t:
        options = tf.io.TFRecordOptions(compression_type="ZLIB")
        with tf.io.TFRecordWriter(out, options) as writer, open(
                os.path.join(folder, "train.bson"), "rb") as f:
            for d in bson.decode_file_iter(f):
                for img in d["imgs"]:
                    pixels = np.asarray(Image.open(io.BytesIO(img["picture"])))
                    ex = tf.train.Example(features=tf.train.Features(feature={
                        "image": feature(bytes_list=tf.train.BytesList(value=[img["picture"]])),
                        "height": feature(int64_list=tf.train.Int64List(value=[pixels.shape[0]])),
                        "width": feature(int64_list=tf.train.Int64List(value=[pixels.shape[1]])),
                        "label": feature(int64_list=tf.train.Int64List(value=[d["category_id"]])),
                        "product_id": feature(int64_list=tf.train.Int64List(value=[d["_id"]]))}))
                    writer.write(ex.SerializeToString())
                n += 1
                if n >= limit:
                    break
    return {"seconds": t.seconds, "products": n}


def tfds_build(folder: str, beam: bool, config: str | None = None) -> dict:
    """`tfds build` as a user runs it, in a child process; peak memory of the largest
    process in its tree (the command or one of its workers)."""
    out = tempfile.mkdtemp(prefix="tfcdisc-bench-")
    cmd = [os.path.join(os.path.dirname(sys.executable), "tfds"), "build",
           str(common.ROOT.parent / "tfds_builder" / "cdiscount"), "--manual_dir", folder,
           "--data_dir", out]
    if beam:
        cmd.append(f"--beam_pipeline_options={_BEAM}")
    if config:
        cmd.append(f"--config={config}")
    try:
        with common.Timer() as t:
            done = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        info = json.loads(next(pathlib.Path(out).glob("cdiscount/*/*/dataset_info.json"))
                          .read_text())
        products = sum(int(s.get("numExamples", 0) or sum(map(int, s["shardLengths"])))
                       for s in info["splits"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": t.seconds, "products": products, "peak_process_mb": round(peak)}


def _folders() -> dict[str, pathlib.Path]:
    big = common.catalogue("synth-1gb", 130_000, 1_000)
    small = common.CACHE / "synth-100mb"
    common.prefix_copy(big / "train.bson", small / "train.bson", 100_000_000)
    for name in ("test.bson", "category_names.csv"):
        if not (small / name).exists():
            shutil.copy(big / name, small / name)
    large = common.CACHE / "synth-520k"
    if not (large / "category_names.csv").exists():
        # Rendering 520,000 products takes hours on 2 cores; the 1 GB catalogue's products
        # four times over, under new _ids, take seconds (`synth.replicate`).
        from tfcdisc.catalogue import synth
        large.mkdir(parents=True, exist_ok=True)
        synth.replicate(str(big), str(large), _COPIES)
    return {"100 MB": small, "1 GB": big, "4 GB": large}


_COPIES = 4


def read_speed(path: pathlib.Path) -> dict:
    """Sequential read of the whole file in 8 MiB requests: first cold (its pages dropped
    from the page cache with posix_fadvise), then warm."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for label in ("cold", "warm"):
            os.lseek(fd, 0, os.SEEK_SET)
            with common.Timer() as t:
                while os.read(fd, 8 << 20):
                    pass
            out[label] = os.path.getsize(path) / t.seconds / 1e6
    finally:
        os.close(fd)
    return out


def run() -> None:
    folders = _folders()
    for folder in folders.values():  # indexes are built once, as `inspect` would
        common.run_stage(__name__, "--stage", "index", "--folder", str(folder))
    large = folders["4 GB"]
    speed = read_speed(large / "train.bson")
    common.log("read", speed)
    r = {}
    common.warm(large / "train.bson")
    r["kaggle"] = common.run_stage(__name__, "--stage", "kaggle", "--folder", str(large))
    common.log("kaggle", r["kaggle"])
    r["one"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large),
                                "--workers", "1")
    r["two"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large))
    r["headers"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large),
                                    "--config", _HEADERS_ONLY)
    common.warm(folders["1 GB"] / "train.bson")
    r["1gb"] = common.run_stage(__name__, "--stage", "local", "--folder",
                                str(folders["1 GB"]))
    common.warm(folders["100 MB"] / "train.bson")
    r["beam"] = common.run_stage(__name__, "--stage", "beam", "--folder",
                                 str(folders["100 MB"]))
    common.log(r)
    md = report(r, speed, (large / "train.bson").stat().st_size / 1e9)
    common.write_section("tfds", md)
    print(md)


def report(r: dict, speed: dict, size_gb: float) -> str:
    """The RESULTS.md section from one run's measurements."""
    def rate(x):
        return x["products"] / x["seconds"]

    kaggle = rate(r["kaggle"])
    rows = [["Kaggle-kernel way (decode_file_iter, PIL decode, Example per image, ZLIB)",
             "4 GB", 1, f"{r['kaggle']['seconds']:.0f}", f"{kaggle:,.0f}", f"{kaggle:,.0f}",
             "1.0x", "1.0x", f"{r['kaggle']['peak_rss_mb']:.0f}"]]
    for key, name, label, cores in (
            ("one", "`tfds build`, one worker process", "4 GB", 1),
            ("two", "`tfds build` (default: a worker process per core)", "4 GB", 2),
            ("headers", "`tfds build`, headers only (`decode_images: false`)", "4 GB", 2),
            ("1gb", "`tfds build`", "1 GB", 2),
            ("beam", "`tfds build` Beam DirectRunner (2 workers, multi_processing)",
             "100 MB", 2)):
        x = r[key]
        rows.append([name, label, cores, f"{x['seconds']:.0f}", f"{rate(x):,.0f}",
                     f"{rate(x) / cores:,.0f}", f"{rate(x) / kaggle:.1f}x",
                     f"{rate(x) / cores / kaggle:.1f}x", x["peak_process_mb"]])
    two, one, small = r["two"], r["one"], r["1gb"]
    marginal = (two["products"] - small["products"]) / (two["seconds"] - small["seconds"])
    build_mb_s = size_gb * 1e3 / two["seconds"]
    real = 7_069_896 + 1_768_182
    md = f"""## Dataset build (issues 3, 10 and 12)

`python -m benchmarks.run tfds` on {common.machine()}. The whole `tfds build` command as a
user runs it (start-up, planning, indexes already built, shard writing, statistics)
against the Kaggle-kernel way, side by side in this one run on the same warm synthetic
catalogue: train.bson of {size_gb:.1f} GB with {two['products'] - 1000:,} products
(`synth.replicate`: the 1 GB catalogue's 130,000 rendered products {_COPIES} times under
new `_id`s, so generating it takes seconds) and a test.bson of 1,000. Products/s counts
train + test products over the whole command; "per core" divides by the processes
doing the work. Peak memory: the largest single process (command or worker),
TensorFlow's ~0.6 GB included.

{common.table(["contender", "catalogue", "processes", "seconds", "products/s",
               "products/s per core", "vs Kaggle way", "vs Kaggle way, per core",
               "peak process memory (MB)"], rows)}

**Headline: the whole command converts at {rate(two) / kaggle:.1f}x the Kaggle way on this
machine (2 processes against its one), {rate(two) / 2 / kaggle:.1f}x per core, and
{rate(one) / kaggle:.1f}x with one process against one.** Target: 10x, whole command:
{"met." if rate(two) / kaggle >= 10 else f"**missed** ({rate(two) / kaggle:.1f}x of 10x). Why: the image screen (every JPEG decoded once at 1/8 scale, so that nothing undecodable reaches training; issue 10) is most of the build's time. Checking headers only, the same command gives {rate(r['headers']) / kaggle:.1f}x, which meets the target but lets a JPEG with garbled scan data through to training. And the Kaggle way decodes these synthetic JPEGs faster than real photos (about 1,000 products/s was reported on the real data, {kaggle:,.0f} here), which flatters it."}

The physical limit: reading the same {size_gb:.1f} GB sequentially runs at
{speed['cold']:,.0f} MB/s cold (pages dropped with `posix_fadvise`) and {speed['warm']:,.0f} MB/s
warm; the build consumes {build_mb_s:,.0f} MB/s, {build_mb_s / speed['cold']:.0%} of the cold
read speed: it is bound by its CPU work (BSON framing, the image screen, serializing),
not by the disk.

Second figure, derived: from the 1 GB to the 4 GB catalogue the build adds
{two['products'] - small['products']:,} products in {two['seconds'] - small['seconds']:.0f} s,
**{marginal:,.0f} products/s** once running ({marginal / kaggle:.1f}x the Kaggle way); at that
rate the real catalogue ({real:,} products) converts in about {real / marginal / 60:.0f}
minutes here, against {real / kaggle / 3600:.1f} hours the Kaggle way.

Memory per worker does not grow with the file: the largest process peaked at
{small['peak_process_mb']} MB on the 1 GB catalogue and {two['peak_process_mb']} MB on the
4 GB one (TensorFlow's ~0.6 GB included). A worker holds its shard's members file (about
32 bytes a product of its shard), never the whole index; the launching process holds
the index (about 30 bytes a product: 270 MB for the real catalogue).
"""
    return md


def _stage_index(a) -> None:
    from tfcdisc.catalogue import index
    for name in ("train.bson", "test.bson"):
        index.load_or_build(os.path.join(a.folder, name))
    common.report({})


def _stage_kaggle(a) -> None:
    common.reset_peak()
    out = tempfile.mktemp(suffix=".tfrecord")
    try:
        common.report(kaggle_kernel(a.folder, out, a.limit or 1 << 62))
    finally:
        if os.path.exists(out):
            os.remove(out)


def _stage_build(a) -> None:
    if a.workers:
        os.environ["TFCDISC_BUILD_WORKERS"] = a.workers
    print(json.dumps(tfds_build(a.folder, beam=a.stage == "beam", config=a.config)))


def main() -> None:
    common.stage_main(run, {"index": _stage_index, "kaggle": _stage_kaggle,
                            "local": _stage_build, "beam": _stage_build},
                      strings=["folder", "config", "workers"], ints=["limit"])


if __name__ == "__main__":
    main()
