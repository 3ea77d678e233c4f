"""Shared fixtures: small synthetic catalogues made by the tests themselves."""

import io
import os
import pathlib
import sys

import bson
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tfds_builder.cdiscount
REAL_CATEGORY_NAMES = REPO.parent / "shared" / "data" / "category_names.csv"


def once_per_run(tmp_path_factory, name: str, make):
    """``make(folder)`` run once per test run, whatever the number of xdist workers: the
    first worker to get here builds into a folder they all share (beside their own base
    temp folders), under a file lock; the others wait, then reuse it."""
    import fcntl
    import pickle
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    folder = shared / f"shared-{name}"
    done = shared / f"shared-{name}.pickle"
    with open(shared / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            value = make(folder)
            done.write_bytes(pickle.dumps(value))
            return value
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory):
    """A small Kaggle-layout folder: 240 train and 60 test products in 12 categories."""
    def make(out):
        from tfcdisc.catalogue import synth
        return out, synth.generate(str(out), 240, 60, num_categories=12, seed=7, workers=1)
    return once_per_run(tmp_path_factory, "catalogue", make)


@pytest.fixture(scope="session")
def dataset(catalogue, tmp_path_factory):
    """The catalogue built into a TFDS dataset; returns the builder."""
    import fcntl
    folder, _ = catalogue
    data = once_per_run(tmp_path_factory, "data", lambda out: (build_dataset(folder, out),
                                                                out)[1])
    with open(f"{data}.open.lock", "w") as lock:  # one build lock holder at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_dataset(folder, data)  # the built dataset, opened (nothing is rebuilt)


@pytest.fixture(scope="session")
def exported(dataset, tmp_path_factory):
    """A small model trained for a few steps on the dataset and exported: (run, export)."""
    def make(folder):
        from tfcdisc.serve import exporting
        from tfcdisc.learn import training
        run = folder / "run"
        training.train(training.TrainConfig(
            data_dir=dataset.data_dir, model_dir=str(run), backbone="small_cnn",
            image_size=32, global_batch_size=32, epochs=2, steps_per_epoch=8,
            optimizer="adamw", learning_rate=0.004, bn_momentum=0.9, strategy="default",
            mixed_precision="float32", shuffle_buffer=256, eval_batch_size=16, seed=0,
            verbose=0))
        out = folder / "export" / "model"
        exporting.export(str(run), str(out))
        return run, out
    return once_per_run(tmp_path_factory, "exported", make)


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 free right now (for processes of one cluster)."""
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def small_model(backbone: str) -> dict:
    """``backbone`` and ``image_size`` for tests that compile a flagfile's model on the
    CPU: its family's smallest member (the same layers: MBConv, Fused-MBConv and
    squeeze-excite; ConvNeXt blocks) in a fraction of the compile time, at a small size
    (Xception's smallest, 71). The preflight benchmark compiles the flagfile's own
    backbone for its TPU."""
    return {"backbone": {"efficientnetv2": "efficientnetv2_b0", "convnext": "convnext_tiny"}.get(
                backbone.split("_")[0], backbone),
            "image_size": 71 if backbone == "xception" else 32}


def train_config(dataset, model_dir, **overrides):
    """A TrainConfig for a few fast steps of the small CNN on a built dataset (its builder
    or its data dir)."""
    from tfcdisc import settings
    data_dir = str(getattr(dataset, "data_dir", dataset))
    base = dict(data_dir=data_dir, model_dir=str(model_dir), backbone="small_cnn",
                image_size=32, decode_size=48, global_batch_size=16, epochs=1,
                steps_per_epoch=3, optimizer="adamw", learning_rate=0.004, bn_momentum=0.9,
                strategy="default", mixed_precision="float32", shuffle_buffer=256,
                eval_batch_size=8, seed=0, verbose=0)
    return settings.TrainConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Index files that cannot sit beside a BSON go to a per-test cache."""
    monkeypatch.setenv("TFCDISC_CACHE", str(tmp_path / "cache"))


def doc(pid=1, cid=1000000100, n_images=1, **extra) -> bytes:
    """One BSON product document; ``extra`` overrides or adds fields (None removes one)."""
    fields = {"_id": pid, "imgs": [{"picture": b"\xff\xd8jpeg%d-%d\xff\xd9" % (pid, i)}
                                   for i in range(n_images)]}
    if cid is not None:
        fields["category_id"] = cid
    for key, value in extra.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return bson.encode(fields)


def write(tmp_path, *docs: bytes, name="train.bson") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(docs))
    return str(path)


def jpeg_bytes(mode="RGB", size=(180, 180), progressive=False, seed=0) -> bytes:
    """A real JPEG in any PIL mode (L: grayscale, CMYK, RGB), optionally progressive."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = rng.integers(0, 255, (size[0], size[1], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, progressive=progressive)
    return out.getvalue()


def garbled_jpeg(seed=0) -> bytes:
    """A JPEG whose headers are intact and whose scan data is garbage: it passes a header
    check and then fails TensorFlow's decoder (``jpeg::Uncompress failed``)."""
    import random
    good = jpeg_bytes(seed=seed)
    sos = good.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2:sos + 4], "big")
    noise = random.Random(seed).randbytes(len(good) - 2 - start)
    return good[:start] + noise + good[-2:]


def huge_jpeg(height=60000, width=60000) -> bytes:
    """A small JPEG whose frame header claims a huge frame."""
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def write_taxonomy(folder, category_ids) -> None:
    rows = ["category_id,category_level1,category_level2,category_level3"]
    rows += [f"{c},L1-{i % 2},L2-{i % 3},LEAF {c}" for i, c in enumerate(category_ids)]
    (folder / "category_names.csv").write_text("\n".join(rows) + "\n")


def build_dataset(manual_dir, data_dir, **config):
    """Builds the cdiscount dataset with the TFDS builder; returns the builder."""
    import tensorflow_datasets as tfds
    from tfds_builder.cdiscount import cdiscount_dataset_builder as cdb
    builder = cdb.Builder(data_dir=str(data_dir),
                          config=cdb.CdiscountConfig(name="test", **config) if config else None)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def slots(images) -> list[bytes]:
    """A product's images in the export's 4 slots: the first 4, b"" padding."""
    return list(images[:4]) + [b""] * (4 - len(images[:4]))


def product_batches(builder, split: str, batch_size: int, image_size: int):
    """A built split's products, decoded and statically batched as evaluation reads them."""
    from tfcdisc.learn import input_pipeline
    return input_pipeline.batch_products(
        input_pipeline.split_products(builder, split), batch_size, image_size,
        builder.info.splits[split].num_examples)


def read_split(builder, split) -> dict:
    """{product_id: example} with image bytes as stored (no decoding)."""
    import tensorflow_datasets as tfds
    ds = builder.as_dataset(split=split, decoders={"images": tfds.decode.SkipDecoding()})
    out = {}
    for ex in tfds.as_numpy(ds):
        ex = dict(ex)
        ex["images"] = [bytes(b) for b in ex["images"]]
        out[int(ex["product_id"])] = ex
    return out


def run_training(cfg, *, logical_cpus: int = 1, env: dict | None = None,
                 kill_at_step: int = -1, timeout: int = 600, wait: bool = True,
                 backend: str = "tensorflow"):
    """`training.train(cfg)` in a fresh process (tests/train_process.py): on ``backend``
    (JAX over two CPU devices, as on a TPU's cores), logical CPUs for TensorFlow, an
    environment, a SIGKILL at a global step; returns the CompletedProcess, or the Popen
    with ``wait=False``."""
    import dataclasses
    import json
    import subprocess
    args = [sys.executable, str(REPO / "tests" / "train_process.py"),
            json.dumps(dataclasses.asdict(cfg)), str(logical_cpus), str(kill_at_step)]
    full_env = {**os.environ, "KERAS_BACKEND": backend, **(env or {})}
    if backend == "jax":
        full_env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
        # The same programs without XLA's expensive CPU code-generation passes: ~15% less
        # compile time for runs of a few untimed steps (none of these is the TPU compiler).
        full_env.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=full_env)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env)


_SERVE_SCRIPT = """
import json, sys
sys.modules["tfcdisc"] = sys.modules["jax"] = None  # any import of either now fails
for name in ("tfcdisc", "jax"):
    try:
        __import__(name)
        raise SystemExit(name + " imported")
    except ImportError:
        pass
import tensorflow as tf
images = json.loads(sys.stdin.read())
model = tf.saved_model.load(sys.argv[1])
out = model.signatures["serving_default"](
    images=tf.constant([[bytes.fromhex(b) for b in p] for p in images]))
meta = model.signatures["metadata"]()
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()} |
                 {"taxonomy": meta["taxonomy_json"].numpy().decode()}))
"""


def serve_without_tfcdisc(export_dir, images: list[list[bytes]]) -> dict:
    """An export's ``serving_default`` on products' JPEG bytes (4 slots, b"" padding), in a
    process that can import neither tfcdisc nor jax: the SavedModel must stand alone. Its outputs as
    lists, and ``taxonomy`` (the metadata's JSON)."""
    import json
    import subprocess
    done = subprocess.run([sys.executable, "-c", _SERVE_SCRIPT, str(export_dir)],
                          capture_output=True, text=True, timeout=300,
                          input=json.dumps([[b.hex() for b in p] for p in images]))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def last_json(text: str) -> dict:
    import json
    return json.loads(text.strip().splitlines()[-1])


def epoch_scalars(log_dir) -> dict:
    """{tag: [steps]} of the ``epoch_*`` scalars in a TensorBoard log folder."""
    import tensorflow as tf
    found: dict = {}
    for path in sorted(pathlib.Path(log_dir).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag.startswith("epoch_"):
                    found.setdefault(value.tag, []).append(event.step)
    return found
