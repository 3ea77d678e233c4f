"""Batch prediction: `tfcdisc.predict` against the bare forward pass of the same model.

    python -m benchmarks.run predict

Targets (issue 5): predict's products/s >= 0.9x the exported model's forward pass on
already-decoded tensors of the same products (decoding and I/O hide behind the model);
peak memory flat from 1,000 to 20,000 products. Extrapolates the real test set.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from benchmarks import common

REAL_TEST_PRODUCTS = 1_768_182
MODELS = {  # name: (flags over the demo flagfile, what it stands for)
    "demo": ([], "demo small_cnn, 64 px"),
    "effv2b0": (["--backbone=efficientnetv2_b0", "--image_size=180"],
                "EfficientNetV2-B0, 180 px (untrained weights: speed only)"),
}


def _export(name: str) -> pathlib.Path:
    """A tiny training run of the model, exported once and cached."""
    out = common.CACHE / f"export-{name}"
    if (out / "saved_model.pb").exists():
        return out
    from benchmarks import bench_train
    import subprocess
    run = common.CACHE / f"run-{name}"
    data = bench_train._dataset_dir()
    for cmd in (["tfcdisc.train", f"--flagfile={common.ROOT.parent}/experiments/demo_cpu.cfg",
                 f"--data_dir={data}", f"--model_dir={run}", "--epochs=1", "--steps_per_epoch=2",
                 "--eval_max_batches=1", "--verbose=0", *MODELS[name][0]],
                ["tfcdisc.export", f"--model_dir={run}", f"--export_dir={out}"]):
        subprocess.run([sys.executable, "-m", *cmd], check=True, capture_output=True)
    return out


def _test_files() -> dict[str, pathlib.Path]:
    folder = common.catalogue("synth-test20k", 200, 20_000, seed=3)
    big = folder / "test.bson"
    from tfcdisc import index
    idx = index.load_or_build(str(big))
    out = {"20k": big}
    for name, n in (("warmup", 300), ("1k", 1000), ("2k", 2000), ("5k", 5000),
                    ("10k", 10000)):
        out[name] = common.prefix_copy(big, common.CACHE / f"synth-test-{name}" / "test.bson",
                                       int(idx.offsets[n]))
    return out


def _stage_predict(saved_model: str, bson: str, warmup: str) -> dict:
    import tempfile
    from tfcdisc import index, predict
    index.load_or_build(bson)  # as a second run would find it
    loaded = predict.load_model(saved_model)
    # The model's first calls (graph optimisation) are left out, as for the forward pass.
    predict.predict(loaded, tempfile.mktemp(suffix=".csv"), bson=warmup, progress=False)
    common.reset_peak()
    stats = predict.predict(loaded, tempfile.mktemp(suffix=".csv"), bson=bson,
                            batch_size=256, progress=False)
    return {"products": stats.products, "seconds": stats.seconds,
            "products_per_s": stats.products / stats.seconds}


def _stage_forward(saved_model: str, bson: str, n: int) -> dict:
    from tfcdisc import predict
    model, meta = predict.load_model(saved_model)
    stats = predict.PredictStats()
    products = predict.bson_products(bson, stats, labeled=False)
    first = [next(products) for _ in range(n)]
    batches = [(images, mask) for _, images, mask, _ in predict.product_batches(
        iter(first), meta["image_size"], 256)]  # decoded once, kept in memory
    forward = model.signatures["predict_decoded"]
    forward(images=batches[0][0], mask=batches[0][1])  # warm-up
    with common.Timer() as t:
        for images, mask in batches:
            forward(images=images, mask=mask)["category_id"].numpy()
    return {"products": n, "seconds": t.seconds, "products_per_s": n / t.seconds}


def run() -> None:
    files = _test_files()
    rows = []
    for name, (_, label) in MODELS.items():
        saved = str(_export(name))
        n = 2048 if name == "demo" else 768
        fwd = common.run_stage(__name__, "--stage", "forward", "--model", saved, "--bson",
                               str(files["20k"]), "--n", str(n))
        bson = files["20k"] if name == "demo" else files["2k"]
        pred = common.run_stage(__name__, "--stage", "predict", "--model", saved, "--bson",
                                str(bson), "--warmup", str(files["warmup"]))
        common.log(name, fwd, pred)
        ratio = pred["products_per_s"] / fwd["products_per_s"]
        hours = REAL_TEST_PRODUCTS / pred["products_per_s"] / 3600
        rows.append([label, f"{fwd['products_per_s']:,.0f}", f"{pred['products_per_s']:,.0f}",
                     f"{ratio:.2f}x", f"{hours:,.1f} h"])
    sizes = ("1k", "5k", "10k", "20k")
    mem = {k: common.run_stage(__name__, "--stage", "predict", "--model",
                               str(_export("demo")), "--bson", str(files[k]), "--warmup",
                               str(files["warmup"])) for k in sizes}
    md = f"""## Batch prediction (issue 5)

`python -m benchmarks.run predict` on {common.machine()}, CPU only. Synthetic test.bson of
20,000 products (1.75 images each; EfficientNetV2-B0 on its first 2,000). Forward pass: the
exported model's `predict_decoded` signature on products already decoded in memory,
batches of 256. Predict: the whole `tfcdisc.predict` (BSON reading, JPEG checks, parallel
decoding, model, CSV writing). Both after the model's first calls (graph optimisation).

{common.table(["model", "forward pass only (products/s)", "tfcdisc.predict (products/s)",
               "predict / forward (target >= 0.9x)", "real test set (1,768,182) at this rate"],
              rows)}

Peak memory of `tfcdisc.predict` (demo model) above its post-import size, by products
predicted: {", ".join(f"{k}: {mem[k]['peak_growth_mb']:.0f} MB" for k in sizes)}. One batch of
predictions is held at a time and rows are written as they come; what rises early is
tf.data's autotuned buffers (a few decoded batches) ramping up, and the increments shrink
as the run goes on, where a leak would grow in step with the products.

On these 2 cores decoding shares the CPU with the model, which is why predict stays below
the bare forward pass; on a GPU host the model leaves the cores to the decoder.
"""
    common.write_section("predict", md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("stage", "model", "bson", "warmup"):
        ap.add_argument(f"--{name}")
    ap.add_argument("--n", type=int)
    a = ap.parse_args()
    if a.stage == "predict":
        common.report(_stage_predict(a.model, a.bson, a.warmup))
    elif a.stage == "forward":
        common.report(_stage_forward(a.model, a.bson, a.n))
    else:
        run()


if __name__ == "__main__":
    sys.exit(main())
