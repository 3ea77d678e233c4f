"""Dataset build: `tfds build` against the published Kaggle-kernel conversion.

    python -m benchmarks.run tfds

Targets (issue 3), on 2 cores: `tfds build` on one machine >= 10,000 products/s
(7.07M products in under 12 minutes) and >= 10x the Kaggle-kernel way in the same run;
peak memory flat as the file grows (100 MB vs 1 GB). Beam's DirectRunner is measured
too: it is the path to Dataflow, not the fast local path.
"""

from __future__ import annotations

import argparse
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
    return {"100 MB": small, "1 GB": big}


def run() -> None:
    folders = _folders()
    for folder in folders.values():  # indexes are built once, as `inspect` would
        common.run_stage(__name__, "--stage", "index", "--folder", str(folder))
        common.warm(folder / "train.bson")
    r = {}
    r["kaggle"] = common.run_stage(__name__, "--stage", "kaggle", "--folder",
                                   str(folders["100 MB"]), "--limit", "6000")
    for label, folder in folders.items():
        r[("local", label)] = common.run_stage(__name__, "--stage", "local", "--folder",
                                               str(folder))
        common.log("tfds build", label, r[("local", label)])
    # The image screen's decode, measured as its absence: headers only, same catalogue.
    r["headers"] = common.run_stage(__name__, "--stage", "local", "--folder",
                                    str(folders["1 GB"]), "--config", _HEADERS_ONLY)
    r["beam"] = common.run_stage(__name__, "--stage", "beam", "--folder",
                                 str(folders["100 MB"]))
    common.log(r)

    def rate(x):
        return x["products"] / x["seconds"]

    small, big = r[("local", "100 MB")], r[("local", "1 GB")]
    marginal = (big["products"] - small["products"]) / (big["seconds"] - small["seconds"])
    fixed = big["seconds"] - big["products"] / marginal
    kaggle = rate(r["kaggle"])
    rows = [
        ["Kaggle-kernel way (decode_file_iter, PIL decode, Example per image, ZLIB)",
         "100 MB (first 6,000 products)", f"{r['kaggle']['seconds']:.1f}", f"{kaggle:,.0f}",
         "1.0x", f"{r['kaggle']['peak_rss_mb']:.0f}"],
        ["`tfds build` one machine (2 processes)", "100 MB", f"{small['seconds']:.1f}",
         f"{rate(small):,.0f}", f"{rate(small) / kaggle:.1f}x", small["peak_process_mb"]],
        ["`tfds build` one machine (2 processes)", "1 GB", f"{big['seconds']:.1f}",
         f"{rate(big):,.0f}", f"{rate(big) / kaggle:.1f}x", big["peak_process_mb"]],
        ["`tfds build` one machine, headers only (`decode_images: false`)", "1 GB",
         f"{r['headers']['seconds']:.1f}", f"{rate(r['headers']):,.0f}",
         f"{rate(r['headers']) / kaggle:.1f}x", r["headers"]["peak_process_mb"]],
        ["`tfds build` Beam DirectRunner (2 workers, multi_processing)", "100 MB",
         f"{r['beam']['seconds']:.1f}", f"{rate(r['beam']):,.0f}",
         f"{rate(r['beam']) / kaggle:.1f}x", r["beam"]["peak_process_mb"]],
    ]
    real = 7_069_896 + 1_768_182
    md = f"""## Dataset build (issues 3 and 10)

`python -m benchmarks.run tfds` on {common.machine()}. Synthetic Kaggle folders (train.bson
of 100 MB and 1.07 GB, test.bson of 1,000 products), warm, offset indexes already built
(an index costs about 0.35 s per GB, see above). Products/s counts train + test products
over the whole command, start-up included. Peak memory: the largest single process
(command or worker), TensorFlow's ~0.6 GB included.

{common.table(["contender", "catalogue", "seconds", "products/s", "vs Kaggle way",
               "peak process memory (MB)"], rows)}

Going from the 100 MB to the 1 GB catalogue, `tfds build` adds
{big['products'] - small['products']:,} products in {big['seconds'] - small['seconds']:.1f} s:
**{marginal:,.0f} products/s** once running ({marginal / kaggle:.0f}x the Kaggle way), after a
fixed start-up of about {fixed:.0f} s (imports, planning, worker start). At that rate the real
catalogue ({real:,} train + test products) converts in about
{(real / marginal + fixed) / 60:.0f} minutes on this machine, versus about
{real / kaggle / 3600:.1f} hours the Kaggle way. Memory does not grow with the file beyond the offset index
(about 30 bytes a product, so about 10 MB more for the 1 GB file). The Kaggle way runs faster
here than the ~1,000 products/s reported for the real data because synthetic JPEGs decode
quickly; the ratio is measured, not assumed.

The image screen's decode (every image decoded once at 1/8 scale, so that nothing
undecodable reaches training; issue 10) is the difference between the two 1 GB rows:
{big['seconds'] - r['headers']['seconds']:.1f} s of {big['seconds']:.1f} s, the build at
{rate(big) / rate(r['headers']):.2f}x the products/s of the same build checking headers only.
"""
    common.write_section("tfds", md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage")
    ap.add_argument("--folder")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--config")
    a = ap.parse_args()
    if a.stage == "index":
        from tfcdisc import index
        for name in ("train.bson", "test.bson"):
            index.load_or_build(os.path.join(a.folder, name))
        common.report({})
    elif a.stage == "kaggle":
        common.reset_peak()
        common.report(kaggle_kernel(a.folder, tempfile.mktemp(suffix=".tfrecord"), a.limit))
    elif a.stage in ("local", "beam"):
        print(json.dumps(tfds_build(a.folder, beam=a.stage == "beam", config=a.config)))
    else:
        run()


if __name__ == "__main__":
    sys.exit(main())
