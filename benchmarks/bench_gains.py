"""Accuracy techniques on a catalogue hard enough to show them (issue 11).

    python -m benchmarks.run gains

On `synth --difficulty=hard` (4,000 train / 1,000 test products, 100 categories): three
runs of `experiments/demo_cpu.cfg` (seeds 0, 1, 2), then product accuracy on the
validation split and on the labelled test.bson for: one model, + flip TTA, + an
ensemble of the three, + a product-level fusion head, + the duplicate-image table, and
all together; each beside its predict time per product. Everything is measured in this one run, on the same data.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from benchmarks import common

_ROOT = common.ROOT.parent
_HARD = dict(num_train=4000, num_test=1000, categories=100, seed=0)


def _cli(*args: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, cwd=_ROOT)
    if done.returncode:
        raise RuntimeError(f"{args}: {done.stderr[-3000:]}")
    return done.stdout


def _prepare(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
    kaggle, data = work / "kaggle", work / "data"
    if not (kaggle / "test_labels.csv").exists():
        _cli("tfcdisc.synth", f"--output_dir={kaggle}",
             f"--num_train_products={_HARD['num_train']}",
             f"--num_test_products={_HARD['num_test']}",
             f"--num_categories={_HARD['categories']}", f"--seed={_HARD['seed']}",
             "--difficulty=hard", "--overwrite")  # its own cache: a killed run left a part
        (work / "synth.json").write_text(json.dumps(_summary(kaggle)))
    if not list(data.glob("cdiscount/*/*/dataset_info.json")):
        # 400 validation products (not the default 2%, 80 here): the duplicate table's
        # weight is chosen on them.
        subprocess.run([str(pathlib.Path(sys.executable).parent / "tfds"), "build",
                        str(_ROOT / "tfds_builder" / "cdiscount"), "--manual_dir", str(kaggle),
                        "--data_dir", str(data),
                        '--config={"name": "val400", "validation_size": 400}'],
                       check=True, capture_output=True, cwd=work)
    return kaggle, data, json.loads((work / "synth.json").read_text())


def _summary(kaggle: pathlib.Path) -> dict:
    """The duplicate rates of the generated catalogue, recomputed from its files."""
    import hashlib
    import numpy as np
    from tfcdisc.catalogue import bsonfile, synth
    seen = {}
    for name in ("train.bson", "test.bson"):
        seen[name] = np.array(
            [(int.from_bytes(hashlib.blake2b(img, digest_size=8).digest(), "little"),
              p.category_id or 0) for p in bsonfile.iter_products(str(kaggle / name))
             for img in p.images], np.uint64).reshape(-1, 2)
    return synth.duplicate_rates(seen["train.bson"], seen["test.bson"])


def _evaluate(export: pathlib.Path, kaggle: pathlib.Path, data: pathlib.Path) -> dict:
    test = json.loads(_cli("tfcdisc.evaluate", f"--saved_model={export}",
                           f"--bson={kaggle / 'test.bson'}",
                           f"--labels={kaggle / 'test_labels.csv'}", "--strategy=default"))
    val = json.loads(_cli("tfcdisc.evaluate", f"--saved_model={export}", f"--data_dir={data}",
                          "--split=validation", "--strategy=default"))
    return {"test": test["product_accuracy"], "validation": val["product_accuracy"],
            "by_images": {n: v["product_accuracy"]
                          for n, v in test["accuracy_by_num_images"].items()},
            "ms_per_product": 1000 * test["input"]["seconds"] / test["products"],
            "duplicates": test.get("duplicates")}


def run() -> None:
    work = common.CACHE / f"gains-hard-2-{_HARD['categories']}"  # this synth, this size
    work.mkdir(parents=True, exist_ok=True)
    kaggle, data, rates = _prepare(work)
    runs = []
    for seed in (0, 1, 2):
        run_dir = work / f"run{seed}"
        if not (run_dir / "checkpoints" / "best.keras").exists() or not (
                run_dir / "history.csv").read_text().count("\n") > 6:
            _cli("tfcdisc.train", f"--flagfile={_ROOT / 'experiments' / 'demo_cpu.cfg'}",
                 f"--data_dir={data}", f"--model_dir={run_dir}", f"--seed={seed}",
                 "--verbose=0")
        runs.append(run_dir)
    exports = {}
    for seed, run_dir in enumerate(runs):
        for tta in ("none", "flip"):
            out = work / f"export{seed}-{tta}"
            _cli("tfcdisc.export", f"--model_dir={run_dir}", f"--export_dir={out}",
                 f"--tta={tta}")
            exports[(seed, tta)] = out
    contenders = {
        "one model": exports[(0, "none")],
        "+ flip TTA": exports[(0, "flip")],
        "+ ensemble of 3": work / "ensemble",
        "+ fusion head": work / "fusion-export",
        "+ duplicates": work / "dup",
        "fusion head + duplicates": work / "fusion-dup",
        "3 x TTA ensemble + duplicates": work / "all",
    }
    _cli("tfcdisc.ensemble", *[f"--saved_model={exports[(s, 'none')]}" for s in range(3)],
         f"--export_dir={contenders['+ ensemble of 3']}")
    _cli("tfcdisc.export", f"--model_dir={runs[0]}", f"--export_dir={contenders['+ duplicates']}",
         f"--duplicates_from={data}")
    head = work / "fusion"
    fused = json.loads(_cli("tfcdisc.train_fusion", f"--model_dir={runs[0]}",
                            f"--fusion_dir={head}", "--epochs=30"))
    _cli("tfcdisc.export", f"--model_dir={runs[0]}", f"--fusion_dir={head}",
         f"--export_dir={contenders['+ fusion head']}")
    _cli("tfcdisc.export", f"--model_dir={runs[0]}", f"--fusion_dir={head}",
         f"--duplicates_from={data}", f"--export_dir={contenders['fusion head + duplicates']}")
    _cli("tfcdisc.ensemble", *[f"--saved_model={exports[(s, 'flip')]}" for s in range(3)],
         f"--export_dir={contenders['3 x TTA ensemble + duplicates']}",
         f"--duplicates_from={data}")
    results = {name: _evaluate(path, kaggle, data) for name, path in contenders.items()}
    common.log(results)
    base = results["one model"]
    counts = sorted({n for r in results.values() for n in r["by_images"]}, key=int)
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['validation']:.3f}", f"{r['test']:.3f}",
                     f"{100 * (r['test'] - base['test']):+.1f}",
                     *[f"{r['by_images'].get(n, 0):.3f}" for n in counts],
                     f"{r['ms_per_product']:.1f}",
                     f"{r['ms_per_product'] / base['ms_per_product']:.1f}x"])
    dup = results["+ duplicates"]["duplicates"] or {}
    best = max(results.values(), key=lambda r: r["test"])
    md = f"""## Accuracy techniques on a hard catalogue (issue 11)

`python -m benchmarks.run gains` on {common.machine()}. `synth --difficulty=hard`:
{_HARD['num_train']:,} train and {_HARD['num_test']:,} test products in {_HARD['categories']}
categories; of the training images {100 * rates['train_images_that_copy_another']:.0f}% copy
another byte for byte (the real train.bson: 38%),
{100 * rates['train_images_with_a_copy_in_another_category']:.0f}% have a copy in another
category, and {100 * rates['test_images_seen_in_train']:.0f}% of test images occur in train.
Three runs of `experiments/demo_cpu.cfg` (seeds 0, 1, 2, small CNN at 64 px, 6 epochs);
"one model" is seed 0. Product accuracy on the validation split and on the labelled test
set, by images per product on the test set, and `evaluate`'s time per test product
(prediction included) on this CPU, all from this one run.

{common.table(["technique", "validation", "test", "test gain (points)",
               *[f"test, {n} image(s)" for n in counts], "ms / product", "cost"], rows)}

The duplicate table knows the validation split's images too (its weight is chosen with a
table of the training split alone), so the validation column of the rows with duplicates
is not held out; their test column is.
The duplicate table's weight, chosen on the validation split (400 products):
{dup.get('weight', float('nan')):.1f} (0 leaves it off); it touched {dup.get('products_touched', 'n/a')}
test products, {dup.get('accuracy_on_touched') or 0:.3f} of them right. Best: {best['test']:.3f}, that is
{100 * (best['test'] - base['test']):+.1f} points over one model (target: +3). The fusion
head trained for 30 epochs on the cached embeddings of run 0 (validation product accuracy
{fused['validation_product_accuracy']:.3f}, the run's own {fused['run_validation_product_accuracy']:.3f}).
The head combines with the duplicate table (blended with its product predictions, weight
{(results['fusion head + duplicates']['duplicates'] or {}).get('weight', float('nan')):.1f} chosen on
validation) but not yet with TTA or an ensemble, so the two combinations are measured
separately.
"""
    common.write_section("gains", md)
    print(md)
