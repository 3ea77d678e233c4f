"""The real catalogue's counts, measured: every stage a user runs, at 7,069,896 train and
1,768,182 test products.

    python -m benchmarks.run scale        # about 15 minutes on 2 cores; resumable

Not in `make bench`'s default list (it writes about 12 GB: a 5.4 GB catalogue, a 6.3 GB
build and the rest; `make bench-scale` runs it). The
catalogue has the real counts: products, the real images-per-product mix (4,369,441
products with 1 image, 1,128,588 with 2, 542,792 with 3, 1,029,075 with 4: 12,371,293
images), the real 5,270 categories (`../shared/data/category_names.csv`, read where it
is), the real test `_id`s (`../shared/data/sample_submission.7z`), documents as Kaggle
stores them (keys ``_id, imgs, category_id``, int32), products in no category order, and
37.7% of training images byte-identical copies of another (the real share: 7.7M unique of
12.4M). Only the JPEGs are small: flat grey 180x180 frames of about 300 bytes, each made
unique by a comment segment (no pixel work at all), so the whole catalogue fits this
machine's disk; what costs per byte (reading, copying) is therefore cheaper than on the
real 58 GB, and what costs per image or per product is what these counts cost.

Each stage is the user's own command in a child process, watched: wall time, the peak
resident memory of every process of its tree (sampled twice a second from /proc), the
sum over time (the memory curve), disk written, products in and rows out. Results go
to ``CACHE/scale/results.json`` stage by stage: a rerun skips the stages done
(``TFCDISC_SCALE_REDO=build,train`` redoes some).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import common

WORK = common.CACHE / "scale"
SHARED = common.ROOT.parent.parent / "shared" / "data"
TRAIN_MIX = {1: 4_369_441, 2: 1_128_588, 3: 542_792, 4: 1_029_075}  # the real train.bson
TRAIN_PRODUCTS = sum(TRAIN_MIX.values())  # 7,069,896
TRAIN_IMAGES = sum(k * v for k, v in TRAIN_MIX.items())  # 12,371,293
TEST_PRODUCTS = 1_768_182
DUPLICATE_SHARE = 1 - 7_700_000 / TRAIN_IMAGES  # copies among the training images
PREDICT_SHARES = (50_000, 200_000)  # test products predicted, from the file's start
STAGES = ("generate", "inspect", "build", "first_batch", "train", "export", "predict")


# --------------------------------------------------------------------------- catalogue


def _jpeg(grey: int) -> bytes:
    import io
    from PIL import Image
    out = io.BytesIO()
    Image.new("L", (180, 180), grey).save(out, "JPEG", quality=30, optimize=True)
    return out.getvalue()


_BASES = None


def unique_jpeg(k: int) -> bytes:
    """Image number ``k``: one of 16 flat grey frames with ``k`` in a comment segment."""
    global _BASES
    if _BASES is None:
        _BASES = [_jpeg(16 * g + 8) for g in range(16)]
    base = _BASES[k % 16]
    return base[:2] + b"\xff\xfe\x00\x0a" + k.to_bytes(8, "big") + base[2:]


def _counts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Images per product for ``n`` products, in the real mix's proportions, shuffled."""
    if n == TRAIN_PRODUCTS:
        counts = np.repeat(np.arange(1, 5), list(TRAIN_MIX.values()))
    else:
        share = np.array(list(TRAIN_MIX.values())) / TRAIN_PRODUCTS
        counts = np.repeat(np.arange(1, 5), np.round(share * n).astype(int))
        counts = np.resize(counts, n)
    rng.shuffle(counts)
    return counts.astype(np.int8)


def _categories(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A long-tailed draw over the real categories, every one at least 12 times (the real
    smallest), in no order."""
    rank = np.arange(len(ids))
    p = (rank + 30.0) ** -1.05
    p /= p.sum()
    out = np.concatenate([np.repeat(ids, 12), rng.choice(ids, n - 12 * len(ids), p=p)])
    rng.shuffle(out)
    return out


def _write_part(task: tuple) -> dict:
    """One contiguous run of products into its own file (the parts are concatenated)."""
    import bson
    path, ids, counts, categories, seed, first_unique, reuse_below = task
    rng = np.random.default_rng(seed)
    draws = iter(rng.random(int(counts.sum())).tolist())
    picks = iter(rng.integers(0, 1 << 62, int(counts.sum())).tolist())
    recent: list[bytes] = []
    unique = first_unique
    with open(path, "wb", buffering=16 << 20) as f:
        for i, pid in enumerate(ids.tolist()):
            images = []
            for _ in range(int(counts[i])):
                if reuse_below:  # test: a share of its images are training images
                    k = next(picks) % reuse_below if next(draws) < 0.38 else unique  # 38% in train
                    unique += k == unique
                    data = unique_jpeg(k)
                elif recent and next(draws) < DUPLICATE_SHARE:
                    data = recent[next(picks) % len(recent)]
                else:
                    data = unique_jpeg(unique)
                    unique += 1
                    if len(recent) < 4096:
                        recent.append(data)
                    else:
                        recent[next(picks) % 4096] = data
                images.append({"picture": data})
            doc = {"_id": pid, "imgs": images}
            if categories is not None:
                doc["category_id"] = int(categories[i])
            f.write(bson.encode(doc))
    return {"unique": unique - first_unique}


def _test_ids() -> np.ndarray:
    import tempfile
    import pandas as pd
    try:
        import py7zr
    except ImportError:
        sys.exit("the scale benchmark reads the real test ids from sample_submission.7z: "
                 "pip install -e '.[bench]' (or run `make bench-scale`)")
    with tempfile.TemporaryDirectory() as tmp:
        with py7zr.SevenZipFile(SHARED / "sample_submission.7z") as z:
            z.extractall(tmp)
        return pd.read_csv(os.path.join(tmp, "sample_submission.csv"))["_id"].to_numpy()


def generate(folder: pathlib.Path) -> dict:
    """train.bson, test.bson, category_names.csv and sample_submission.csv in ``folder``."""
    import concurrent.futures
    import pandas as pd
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2017)
    shutil.copyfile(SHARED / "category_names.csv", folder / "category_names.csv")
    categories = pd.read_csv(folder / "category_names.csv")["category_id"].to_numpy()
    test_ids = _test_ids()
    assert len(test_ids) == TEST_PRODUCTS, len(test_ids)
    pd.DataFrame({"_id": test_ids, "category_id": categories[0]}).to_csv(
        folder / "sample_submission.csv", index=False)
    train_ids = rng.permutation(np.arange(1, TRAIN_PRODUCTS * 3 + 1))[:TRAIN_PRODUCTS]
    train_counts = _counts(TRAIN_PRODUCTS, rng)
    train_cats = _categories(categories, TRAIN_PRODUCTS, rng)
    test_counts = _counts(TEST_PRODUCTS, rng)
    parts, tasks = 4, []
    for name, ids, counts, cats in (("train", train_ids, train_counts, train_cats),
                                    ("test", test_ids, test_counts, None)):
        for k, lo in enumerate(range(0, len(ids), -(-len(ids) // parts))):
            hi = lo + -(-len(ids) // parts)
            first = (k << 40) if name == "train" else (1 << 50) + (k << 40)
            tasks.append((str(folder / f"{name}.part{k}"), ids[lo:hi], counts[lo:hi],
                          None if cats is None else cats[lo:hi], k + (name == "test") * 10,
                          first, _TRAIN_PART0_UNIQUE if name == "test" else 0))
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        done = list(pool.map(_write_part, tasks))
    for name in ("train", "test"):
        with open(folder / f"{name}.bson", "wb") as out:
            for k in range(parts):
                part = folder / f"{name}.part{k}"
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 64 << 20)
                part.unlink()
    train_unique = sum(d["unique"] for d, t in zip(done, tasks) if "train" in t[0])
    return {"train_products": TRAIN_PRODUCTS, "train_images": int(train_counts.sum()),
            "train_unique_images": int(train_unique), "test_products": TEST_PRODUCTS,
            "test_images": int(test_counts.sum()),
            "train_bytes": (folder / "train.bson").stat().st_size,
            "test_bytes": (folder / "test.bson").stat().st_size}


# --------------------------------------------------------------------------- watching


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out["cmd"] = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        pass
    return out


def watched(cmd: list[str], log: pathlib.Path, env: dict | None = None) -> dict:
    """Runs ``cmd``; its wall time, exit code, every process's peak resident memory (MB)
    and the tree's total resident memory twice a second."""
    peaks: dict[int, dict] = {}
    curve = []
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=common.ROOT.parent,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
        while proc.poll() is None:
            tree, todo, total = _children(), [proc.pid], 0.0
            while todo:
                pid = todo.pop()
                todo += tree.get(pid, [])
                s = _status(pid)
                if "VmHWM" in s:
                    seen = peaks.setdefault(pid, {"cmd": s.get("cmd", ""), "peak_mb": 0.0})
                    seen["peak_mb"] = max(seen["peak_mb"], s["VmHWM"])
                    total += s.get("VmRSS", 0.0)
            curve.append((round(time.perf_counter() - start, 1), round(total)))
            time.sleep(0.5)  # a benchmark's sampling period, not a test
        seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}:\n"
                           + log.read_text()[-3000:])
    root = peaks.pop(proc.pid, {"peak_mb": 0.0})
    workers = sorted((p["peak_mb"] for p in peaks.values()), reverse=True)
    return {"seconds": round(seconds, 1), "command_peak_mb": round(root["peak_mb"]),
            "processes": 1 + len(peaks),
            "worker_peak_mb": round(workers[0]) if workers else None,
            "peak_total_mb": max((c[1] for c in curve), default=0),
            "curve": curve[:: max(1, len(curve) // 200)]}


def _disk(*paths: pathlib.Path) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        for root, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


# --------------------------------------------------------------------------- stages


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _stage(name: str, data: pathlib.Path) -> dict:
    out = WORK / "out"
    out.mkdir(parents=True, exist_ok=True)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    if name == "generate":
        with common.Timer() as t:
            r = generate(data)
        return {**r, "seconds": round(t.seconds, 1),
                "disk_bytes": _disk(data / "train.bson", data / "test.bson")}
    if name == "inspect":
        r = {}
        for split in ("train", "test"):
            idx = data / f"{split}.bson.idx.npz"
            if idx.exists():
                idx.unlink()
            w = watched(_python("tfcdisc.inspect", f"--bson={data}/{split}.bson"),
                        logs / f"inspect-{split}.log")
            r[split] = {**w, "disk_bytes": _disk(idx)}
        return r
    if name == "build":
        target = out / "data"
        shutil.rmtree(target, ignore_errors=True)
        tfds = os.path.join(os.path.dirname(sys.executable), "tfds")
        w = watched([tfds, "build", "tfds_builder/cdiscount", f"--manual_dir={data}",
                     f"--data_dir={target}"], log)
        info = json.loads(next(target.glob("cdiscount/*/*/dataset_info.json")).read_text())
        rows = {s["name"]: sum(map(int, s["shardLengths"])) for s in info["splits"]}
        return {**w, "rows": rows, "disk_bytes": _disk(target)}
    if name == "first_batch":
        return common.run_stage(__name__, "--stage", "first_batch", "--folder",
                                str(out / "data"), timeout=3600)
    if name == "train":
        run = out / "run"
        shutil.rmtree(run, ignore_errors=True)
        w = watched(_python("tfcdisc.train", "--flagfile=experiments/demo_cpu.cfg",
                            f"--data_dir={out / 'data'}", f"--model_dir={run}", "--epochs=1",
                            f"--steps_per_epoch={_TRAIN_STEPS}", "--eval_max_batches=8"), log)
        return {**w, "steps": _TRAIN_STEPS, "disk_bytes": _disk(run)}
    if name == "export":
        export = out / "export"
        shutil.rmtree(export, ignore_errors=True)
        w = watched(_python("tfcdisc.export", f"--model_dir={out / 'run'}",
                            f"--export_dir={export}", f"--duplicates_from={out / 'data'}"), log)
        table = export / "assets" / "duplicates.npz"
        keys = int(np.load(table)["keys"].shape[0]) if table.exists() else None
        return {**w, "table_keys": keys, "disk_bytes": _disk(export)}
    if name == "predict":
        r = {}
        for n in PREDICT_SHARES:
            part = common.prefix_products(data / "test.bson", out / f"test-{n}.bson", n)
            for stale in out.glob(f"test-{n}.bson.idx.npz"):
                stale.unlink()
            csv = out / f"submission-{n}.csv"
            w = watched(_python("tfcdisc.predict", f"--saved_model={out / 'export'}",
                                f"--bson={part}", f"--output={csv}", "--strategy=default"),
                        logs / f"predict-{n}.log")
            rows = sum(1 for _ in open(csv)) - 1
            r[str(n)] = {**w, "rows": rows, "disk_bytes": _disk(csv)}
        return r
    raise ValueError(name)


_TRAIN_STEPS = 40
_TRAIN_PART0_UNIQUE = 1_500_000  # fewer than the first train part's unique images (~1.9M)


def _stage_first_batch(a) -> None:
    """Time to the first training batch and the shuffle buffer's memory, at the real
    count: the pipeline of `tfcdisc.train` (batch 128, the default 16,384-image buffer)."""
    common.reset_peak()
    from tfcdisc.learn import input_pipeline as ip
    with common.Timer() as opened:
        builder = ip.load_builder(a.folder)
    ds = iter(ip.train_dataset(builder, 128, ip.PipelineOptions(decode_size=180, seed=0)))
    with common.Timer() as first:
        next(ds)
    base = common.rss_mb()
    with common.Timer() as more:
        for _ in range(300):  # past the buffer's fill: 16,384 images
            next(ds)
    common.report({"open_seconds": round(opened.seconds, 2),
                   "first_batch_seconds": round(first.seconds, 2),
                   "images_per_s_after": round(300 * 128 / more.seconds),
                   "rss_after_first_mb": round(base),
                   "rss_after_300_mb": round(common.rss_mb())})


def run() -> None:
    data = WORK / "catalogue"
    path = WORK / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    redo = set(filter(None, os.environ.get("TFCDISC_SCALE_REDO", "").split(",")))
    for name in STAGES:
        if name in results and name not in redo:
            continue
        common.log("scale stage", name)
        results[name] = _stage(name, data)
        results[name]["when"] = time.strftime("%Y-%m-%d %H:%M")
        path.write_text(json.dumps(results, indent=1))
        common.log(name, {k: v for k, v in results[name].items() if k != "curve"})
    md = report(results)
    common.write_section("scale", md)
    print(md)


def _mb(x) -> str:
    return "" if x is None else f"{x:,.0f}"


def report(r: dict) -> str:
    g = r["generate"]
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    rows = []

    def row(stage, cmd, w, products, out, disk):
        rows.append([stage, cmd, f"{w['seconds']:,.0f}", _mb(w["command_peak_mb"]),
                     _mb(w.get("worker_peak_mb")), w["processes"], _mb(w["peak_total_mb"]),
                     gb(disk), products, out])

    for split, n in (("train", g["train_products"]), ("test", g["test_products"])):
        row("inspect", f"`tfcdisc.inspect --bson={split}.bson` (the offset index)",
            r["inspect"][split], f"{n:,}", "index", r["inspect"][split]["disk_bytes"])
    b = r["build"]
    row("build", "`tfds build` (default: headers checked, a worker per core)", b,
        f"{g['train_products'] + g['test_products']:,}",
        ", ".join(f"{k} {v:,}" for k, v in sorted(b["rows"].items())), b["disk_bytes"])
    t = r["train"]
    row("train", f"`tfcdisc.train`, demo flags, {t['steps']} steps of 128 + 8 validation "
        "batches", t, f"{t['steps'] * 128:,} images", "checkpoints", t["disk_bytes"])
    e = r["export"]
    row("export", "`tfcdisc.export --duplicates_from` (the table over the train split's "
        "images, its weight chosen on the 50,000 validation products)", e,
        f"{b['rows']['train']:,} products",
        f"{e['table_keys']:,} table keys" if e["table_keys"] else "", e["disk_bytes"])
    shares = sorted(((k, v) for k, v in r["predict"].items() if k.isdigit()),
                    key=lambda kv: int(kv[0]))
    for n, p in shares:
        row("predict", f"`tfcdisc.predict` on the first {int(n):,} test products", p,
            f"{int(n):,}", f"{p['rows']:,} rows", p["disk_bytes"])
    f = r["first_batch"]
    (n1, p1), (n2, p2) = shares[0], shares[-1]
    rate = (int(n2) - int(n1)) / (p2["seconds"] - p1["seconds"])
    test_hours = g["test_products"] / rate / 3600
    return f"""## The real catalogue's counts (issue 20)

`python -m benchmarks.run scale` on {common.machine()}: every stage a user runs, at the real
counts, on a synthetic catalogue with {g['train_products']:,} train products
({g['train_images']:,} images in the real 1-4 mix, {g['train_unique_images']:,} unique:
{1 - g['train_unique_images'] / g['train_images']:.1%} byte-identical copies, as in the real
file), the real 5,270 categories, and {g['test_products']:,} test products under the real
test `_id`s of `sample_submission.7z` ({g['test_images']:,} images). The JPEGs are small (flat
grey 180x180 frames of about 300 bytes, unique by a comment segment), so train.bson is
{gb(g['train_bytes'])} and test.bson {gb(g['test_bytes'])} instead of 58.2 and 14.5 GB:
per-byte work (reading, copying) is cheaper than on the real files, and so is decoding
a flat frame; per-product and per-image work is what these counts cost. Generating it took
{g['seconds']:.0f} s. Each stage is the user's command in its own process, run
one after the other on this otherwise idle machine; memory is the peak resident size of
the command's own process, of its largest worker, and of their sum, sampled twice a
second (TensorFlow's ~0.6 GB included in each).

{common.table(["stage", "command", "wall s", "command peak MB", "largest worker peak MB",
               "processes", "all processes peak MB", "disk written", "in", "out"], rows)}

Training's input at this count (`input_pipeline.train_dataset`, batch 128, the default
16,384-image shuffle buffer, in one process): the dataset opened in
{f['open_seconds']:.1f} s, the first batch came {f['first_batch_seconds']:.1f} s later, resident
memory {f['rss_after_first_mb']:,} MB after it and {f['rss_after_300_mb']:,} MB after 300 more batches
(the buffer full; {f['images_per_s_after']:,} images/s over them, one process, not a throughput
benchmark). The buffer holds JPEG bytes, not pixels: 16,384 x ~300 bytes here, about 95 MB
at the real files' 5.7 KB a JPEG. Nothing in training's input grows with the catalogue:
the dataset opens from its metadata and reads shards as streams.

Predict's memory is flat in the count where it should be: its largest process peaked at
{_mb(p1['command_peak_mb'])} MB over {int(n1):,} products and {_mb(p2['command_peak_mb'])} MB over {int(n2):,}
(derived: {rate:,.0f} products/s between the two, so the whole real test set,
{g['test_products']:,} products, would take {test_hours:.1f} h here with the demo model). Its
curve (resident MB at a tenth of the run, the largest rise between two samples after it, and
at the end):
{"; ".join(f"{int(n):,} products: {_curve(p)}" for n, p in shares)}. Most of it is fixed:
TensorFlow, the model, and the export's duplicate table of {e['table_keys'] or 0:,} keys,
loaded whole (the export's {gb(e['disk_bytes'])} on disk). The one large rise comes once a run,
neither at the same time nor after the same number of products; why was not measured (an
allocator growing its arena is the likely cause).

Not run at this count: predict on the whole test.bson (about {test_hours:.1f} h at this rate, more
than a session), training to convergence, evaluate (the same path as predict), Beam.
"""


def _curve(w: dict) -> str:
    curve = w["curve"]
    tenth = next(mb for t, mb in curve if t >= w["seconds"] / 10)
    later = [c for c in curve if c[0] >= w["seconds"] / 10]
    rise, at = max(((b[1] - a[1], b[0]) for a, b in zip(later, later[1:])), default=(0, 0))
    return (f"{tenth:,} MB at {w['seconds'] / 10:.0f} s, +{rise:,} MB at {at:.0f} s, "
            f"{curve[-1][1]:,} MB at {curve[-1][0]:.0f} s")


def main() -> None:
    common.stage_main(run, {"first_batch": _stage_first_batch}, strings=["folder"])


if __name__ == "__main__":
    main()
