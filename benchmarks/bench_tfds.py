"""Dataset build: `tfds build` against the published Kaggle-kernel conversion.

    python -m benchmarks.run tfds

Target (issues 12 and 20): the whole command >= 10x the Kaggle-kernel way, side by side
in one run, on a 100,000-product file and on a 520,000-product catalogue, per process and
per core, with no undecodable image able to stop a run (the default build checks headers;
the pipelines' decode masks the rest); beside it the build with the full decode screen
(`decode_images: true`, the default before issue 20), the machine's sequential read
speed for the same bytes, cold and warm, and memory per worker. Beam's DirectRunner is
measured too: it is the path to Dataflow, not the fast local path.
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
_SCREENED = '{"name": "screened", "decode_images": true}'


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
    file_100k = common.CACHE / "synth-100k"
    common.prefix_products(big / "train.bson", file_100k / "train.bson", 100_000)
    tiny = common.CACHE / "synth-1k"
    common.prefix_products(big / "train.bson", tiny / "train.bson", 1_000)
    for folder in (small, file_100k, tiny):
        for name in ("test.bson", "category_names.csv"):
            if not (folder / name).exists():
                shutil.copy(big / name, folder / name)
    large = common.CACHE / "synth-520k"
    if not (large / "category_names.csv").exists():
        # Rendering 520,000 products takes hours on 2 cores; the 1 GB catalogue's products
        # four times over, under new _ids, take seconds (`synth.replicate`).
        from tfcdisc.catalogue import synth
        large.mkdir(parents=True, exist_ok=True)
        synth.replicate(str(big), str(large), _COPIES)
    return {"100 MB": small, "100k": file_100k, "1k": tiny, "4 GB": large}


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
    large, file_100k = folders["4 GB"], folders["100k"]
    speed = read_speed(large / "train.bson")
    common.log("read", speed)
    r = {}
    common.warm(large / "train.bson")
    r["kaggle"] = common.run_stage(__name__, "--stage", "kaggle", "--folder", str(large))
    common.log("kaggle", r["kaggle"])
    r["two"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large))
    r["one"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large),
                                "--workers", "1")
    r["screened"] = common.run_stage(__name__, "--stage", "local", "--folder", str(large),
                                     "--config", _SCREENED)
    common.warm(file_100k / "train.bson")
    r["kaggle_100k"] = common.run_stage(__name__, "--stage", "kaggle", "--folder",
                                        str(file_100k))
    r["100k"] = common.run_stage(__name__, "--stage", "local", "--folder", str(file_100k))
    r["screened_100k"] = common.run_stage(__name__, "--stage", "local", "--folder",
                                          str(file_100k), "--config", _SCREENED)
    r["fixed"] = common.run_stage(__name__, "--stage", "local", "--folder",
                                  str(folders["1k"]))
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

    kaggle, kaggle_100k = rate(r["kaggle"]), rate(r["kaggle_100k"])
    rows = []
    for key, name, label, cores, base in (
            ("kaggle", "Kaggle-kernel way (decode_file_iter, PIL decode, Example per image, "
             "ZLIB)", "520k, 4 GB", 1, kaggle),
            ("two", "**`tfds build`** (default: headers checked, a worker process per core)",
             "520k, 4 GB", 2, kaggle),
            ("one", "`tfds build`, one worker process", "520k, 4 GB", 1, kaggle),
            ("screened", "`tfds build` with the full screen (`decode_images: true`: the "
             "default before)", "520k, 4 GB", 2, kaggle),
            ("kaggle_100k", "Kaggle-kernel way", "100k, 0.8 GB", 1, kaggle_100k),
            ("100k", "**`tfds build`** (default)", "100k, 0.8 GB", 2, kaggle_100k),
            ("screened_100k", "`tfds build` with the full screen", "100k, 0.8 GB", 2,
             kaggle_100k),
            ("fixed", "`tfds build` (default) of 1,000 + 1,000 products: its fixed cost",
             "1k", 2, None),
            ("beam", "`tfds build` Beam DirectRunner (2 workers, multi_processing)",
             "100 MB", 2, None)):
        x = r[key]
        peak = x.get("peak_process_mb", x.get("peak_rss_mb"))
        rows.append([name, label, cores, f"{x['seconds']:.0f}", f"{rate(x):,.0f}",
                     f"{rate(x) / cores:,.0f}",
                     f"{rate(x) / base:.1f}x" if base else "-",
                     f"{rate(x) / cores / base:.1f}x" if base else "-", f"{peak:.0f}"])
    two, one, small = r["two"], r["one"], r["100k"]
    marginal = (two["products"] - small["products"]) / (two["seconds"] - small["seconds"])
    build_mb_s = size_gb * 1e3 / two["seconds"]
    ratios = rate(two) / kaggle, rate(small) / kaggle_100k
    met = all(x >= 10 for x in ratios)
    fixed = r["fixed"]["seconds"]
    budget = small["products"] / (10 * kaggle_100k)  # seconds 10x allows the 100k build
    md = f"""## Dataset build (issues 3, 10, 12 and 20)

`python -m benchmarks.run tfds` on {common.machine()}. The whole `tfds build` command as a
user runs it (start-up, planning, indexes already built, shard writing, statistics)
against the Kaggle-kernel way, side by side in this one run on the same warm synthetic
files: a train.bson of {size_gb:.1f} GB with {two['products'] - 1000:,} products
(`synth.replicate`: the 1 GB catalogue's 130,000 rendered products {_COPIES} times under
new `_id`s, so generating it takes seconds) and the first 100,000 products of the 1 GB
catalogue, each with a test.bson of 1,000. Products/s counts train + test products over
the whole command; "per core" divides by the processes doing the work. Peak memory: the
largest single process (command or worker), TensorFlow's ~0.6 GB included.

{common.table(["contender", "file", "processes", "seconds", "products/s",
               "products/s per core", "vs Kaggle way", "vs Kaggle way, per core",
               "peak process memory (MB)"], rows)}

**Headline: the whole default command converts at {ratios[0]:.1f}x the Kaggle way on the
520,000-product catalogue and {ratios[1]:.1f}x on the 100,000-product file (2 processes
against its one); {rate(two) / 2 / kaggle:.1f}x per core and {rate(one) / kaggle:.1f}x with one
process against one.** Target: 10x, whole command, on both files: {"**met**" if met else "**missed**"}.{"" if met else f" What bounds it: a build's fixed cost (start-up and imports, spawning the workers, each of which imports TensorFlow, planning, statistics), {fixed:.1f} s measured on a 1,000-product file, against the {budget:.1f} s that 10x allows for 100,000 products; the rest of the 100,000-product build took {small['seconds'] - fixed:.1f} s ({(small['products'] - 2000) / (small['seconds'] - fixed):,.0f} products/s, derived)."}
No image that cannot be decoded can stop a run: the build checks every header (not a JPEG,
truncated, wrong size, too large: dropped and counted), and an image whose scan data is
garbage, which only a decode finds, is masked and counted by the decode that training,
validation, evaluation and prediction run anyway (`input_pipeline.decode_failsafe`;
`tests/test_reliability.py` checks it on 300 randomly damaged JPEGs). Decoding every image
in the build as well (`decode_images: true`) costs {r['screened']['seconds'] / two['seconds']:.1f}x the
time ({rate(r['screened']) / kaggle:.1f}x the Kaggle way). The Kaggle way decodes these synthetic JPEGs
faster than real photos (about 1,000 products/s was reported on the real data, {kaggle:,.0f}
here), which flatters it.

The physical limit: reading the same {size_gb:.1f} GB sequentially runs at
{speed['cold']:,.0f} MB/s cold (pages dropped with `posix_fadvise`) and {speed['warm']:,.0f} MB/s
warm; the build consumes {build_mb_s:,.0f} MB/s, {build_mb_s / speed['cold']:.0%} of the cold
read speed: it is bound by its CPU work (BSON framing, header checks, serializing), not by
the disk.

Second figure, derived: from the 100,000-product file to the 4 GB catalogue the build adds
{two['products'] - small['products']:,} products in {two['seconds'] - small['seconds']:.0f} s,
**{marginal:,.0f} products/s** once running ({marginal / kaggle:.1f}x the Kaggle way); the
real-count run (`benchmarks.run scale`, below) measures the real catalogue's build itself.

Memory per worker does not grow with the file: the largest process peaked at
{small['peak_process_mb']} MB on the 100,000-product file and {two['peak_process_mb']} MB on
the 4 GB one (TensorFlow's ~0.6 GB included). A worker holds its shard's members file
(about 32 bytes a product of its shard), never the whole index; the launching process
holds the index (about 30 bytes a product: 270 MB for the real catalogue).
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
