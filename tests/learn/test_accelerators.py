"""What a TPU, a GPU box or a cluster would do, checked on CPU: runtime decisions, XLA
compilation, multi-worker runs as processes on 127.0.0.1, preemption by SIGKILL."""

import csv
import json
import pathlib
import re
import sys
import tomllib

import numpy as np
import pytest

from conftest import REPO, free_ports, last_json, run_training, small_model, train_config
from tfcdisc.learn import distribute, runtime
from tfcdisc import settings


# --------------------------------------------------------------------------- runtimes

TPU_VM = runtime.Runtime("tpu", "colab", "/dev/vfio/0")
GPU = runtime.Runtime("gpu", "kaggle", "nvidia")
CPU = runtime.Runtime("cpu", "other")


@pytest.mark.parametrize("env,devices,which,pci,expected", [
    ({"COLAB_RELEASE_TAG": "x"}, {"/dev/vfio/0", "/dev/vfio/vfio"}, None, {"0x1ae0"},
     ("tpu", "colab")),  # Colab v5e-1
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "TPU_ACCELERATOR_TYPE": "v3-8"}, set(), None,
     set(), ("tpu", "kaggle")),
    ({}, {"/dev/accel0"}, None, set(), ("tpu", "other")),  # a Cloud TPU VM, v2-v4
    ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, {"/dev/nvidia0"}, None, {"0x10de"}, ("gpu", "kaggle")),
    ({"COLAB_GPU": "1"}, set(), "/usr/bin/nvidia-smi", set(), ("gpu", "colab")),
    ({}, set(), None, set(), ("cpu", "other")),
    # Round 3: a GPU VM with VFIO (passthrough) is not a TPU; nor is a stray TPU_NAME.
    ({}, {"/dev/vfio/vfio", "/dev/vfio/0", "/dev/nvidia0"}, None, {"0x10de"}, ("gpu", "other")),
    ({"TPU_NAME": "my-old-tpu"}, set(), None, set(), ("cpu", "other")),
    ({}, {"/dev/kfd"}, None, {"0x1002"}, ("gpu", "other")),  # AMD, tensorflow-rocm
])
def test_runtime_detection(env, devices, which, pci, expected):
    found = runtime.detect(env, devices.__contains__, lambda name: which, lambda: pci,
                           lambda: False)
    assert (found.accelerator, found.host) == expected


def test_every_tensorflow_distribution_is_recognised():
    """tensorflow-rocm and tf-nightly were not taken for TensorFlow: the project's own
    was installed beside them (two distributions writing one module)."""
    nightly = runtime.install_commands(CPU, "/repo", python="py", present={"tf-nightly": "2.21"})
    assert nightly[0] == ["py", "-m", "pip", "uninstall", "--yes", "tf-nightly"]
    rocm = runtime.install_commands(GPU, "/repo", python="py",
                                    present={"tensorflow-rocm": "2.20.0"})
    assert rocm == [["py", "-m", "pip", "install", "--quiet", "-e", "/repo[beam]"]]  # kept


KAGGLE_TPU = runtime.Runtime("tpu", "kaggle", "v5litepod-8")
TF_TPU_VM = runtime.Runtime("tpu", "other", "/dev/accel0")
JAX_TPU = {"jax": "0.6.2", "jaxlib": "0.6.2", "libtpu": "0.0.17"}
_EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
    "optional-dependencies"]


def _after(commands, present):
    """The distributions a runtime holds after the commands (pip simulated: uninstall
    removes, an extra adds its TensorFlow and JAX distributions)."""
    held = dict(present)
    for c in commands:
        if c[3] == "uninstall":
            for name in c[5:]:
                held.pop(name)
            continue
        extras = c[c.index("-e") + 1].split("[")[1].rstrip("]").split(",")
        for req in [r for e in extras for r in _EXTRAS[e]] + c[c.index("-e") + 2:]:
            name = re.split(r"[=<>\[]", req)[0]
            if name.startswith(("tensorflow", "jax")) and name not in held:
                held[name] = "new"
    return held


# What each image ships (their own files: Kaggle/docker-python tpu/requirements.in, Colab's
# TPU runtime after its JAX 0.5.2 upgrade, a Cloud TPU VM tpu-vm-tf image), and what
# tfcdisc must do there.
@pytest.mark.parametrize("where,present,extras,uninstalled", [
    (KAGGLE_TPU, {"tensorflow-cpu": "2.20.0", **JAX_TPU}, "beam", None),  # all kept
    (TPU_VM, dict(JAX_TPU), "tpu,beam", None),  # Colab: no TensorFlow; tensorflow-cpu added
    (TF_TPU_VM, {"tensorflow-tpu": "2.20.0", "libtpu": "0.0.14"}, "beam", None),  # 2nd route
    (TF_TPU_VM, {"tensorflow-tpu": "2.15.0"}, "tpu-tf,beam", ["tensorflow-tpu"]),
    (KAGGLE_TPU, {"tensorflow": "2.21.0", **JAX_TPU}, "tpu,beam", ["tensorflow"]),
    (KAGGLE_TPU, {"tensorflow-tpu": "2.20.0", "tensorflow-cpu": "2.20.0", **JAX_TPU},
     "tpu,beam", ["tensorflow-cpu", "tensorflow-tpu"]),
    (TPU_VM, {}, "tpu,beam", None),  # a bare TPU VM: jax[tpu] and tensorflow-cpu
    (GPU, {"tensorflow": "2.20.0"}, "beam", None),
    (GPU, {"tensorflow-cpu": "2.20.0"}, "gpu,beam", ["tensorflow-cpu"]),  # no GPU kernels
    (GPU, {"tensorflow-tpu": "2.20.0"}, "gpu,beam", ["tensorflow-tpu"]),
    (CPU, {}, "cpu,beam", None),
    (CPU, {"tensorflow-cpu": "2.20.0"}, "jax,beam", None),
], ids=["kaggle-tpu", "colab-tpu", "tf-tpu-vm", "tf-tpu-vm-old", "tpu-tf-2.21",
        "tpu-two-tensorflows", "bare-tpu-vm", "gpu", "gpu-tf-cpu", "gpu-tf-tpu", "cpu",
        "cpu-tf-cpu"])
def test_each_runtime_keeps_what_it_ships_and_gets_one_tensorflow(where, present, extras,
                                                                   uninstalled):
    commands = runtime.install_commands(where, "/r", python="py", present=present)
    removed = [c[5:] for c in commands if c[3] == "uninstall"]
    assert removed == ([uninstalled] if uninstalled else [])
    install = commands[-1]
    assert install[:6] == ["py", "-m", "pip", "install", "--quiet", "-e"]
    assert install[6] == f"/r[{extras}]"
    held = _after(commands, present)
    assert len([n for n in held if n in runtime._TF_DISTRIBUTIONS]) == 1  # never two
    for name in JAX_TPU:  # the runtime's JAX and libtpu: never removed nor replaced
        if name in present:
            assert held[name] == present[name] and name not in " ".join(install)
    if where.accelerator == "tpu" and "jax" not in present and "tensorflow-tpu" not in present:
        assert "jax[tpu]" in install
    if "tpu-tf" in extras:
        assert install[-2:] == ["-f", runtime.LIBTPU_INDEX]


@pytest.mark.parametrize("where,present,expected", [
    (KAGGLE_TPU, {"tensorflow-cpu": "2.20.0", **JAX_TPU}, "jax"),
    (TPU_VM, dict(JAX_TPU), "jax"),
    (TF_TPU_VM, {"tensorflow-tpu": "2.20.0"}, "tensorflow"),  # TPUStrategy's route
    (GPU, {"tensorflow": "2.20.0", "jax": "0.6.2"}, "tensorflow"),
    (CPU, {"tensorflow": "2.20.0", "jax": "0.6.2"}, "tensorflow"),
])
def test_auto_backend_is_jax_on_tpu_vms_with_jax_and_tensorflow_elsewhere(where, present,
                                                                          expected):
    from tfcdisc.learn import backend
    assert backend.choose("auto", where, "jax" in present) == expected
    assert backend.choose("tensorflow", where, True) == "tensorflow"
    with pytest.raises(ValueError, match="JAX is not installed"):
        backend.choose("jax", where, False)


def test_a_keras_imported_with_another_backend_is_refused_with_the_fix():
    import keras
    from tfcdisc.learn import backend
    other = "jax" if keras.backend.backend() == "tensorflow" else "tensorflow"
    with pytest.raises(ValueError, match=f"KERAS_BACKEND={other} before"):
        backend.select(other)
    assert backend.select("auto") == keras.backend.backend()  # auto keeps the process's


def test_tpu_support_problems_say_what_to_install():
    assert runtime.tpu_support_problem({"tensorflow-tpu": runtime.TF_VERSION + ".0"}) is None
    plain = runtime.tpu_support_problem({"tensorflow-cpu": "2.20.0"})
    assert "no TPU kernels" in plain and "--backend=jax" in plain
    both = runtime.tpu_support_problem({"tensorflow": "2.21.0", "tensorflow-tpu": "2.20.0"})
    assert "shadows" in both and "--force-reinstall" in both
    old = runtime.tpu_support_problem({"tensorflow-tpu": "2.15.0"})
    assert "tested with " + runtime.TF_VERSION in old
    beside_jax = runtime.tpu_support_problem({"tensorflow-tpu": "2.20.0", **JAX_TPU})
    assert "--backend=jax" in beside_jax
    assert "pip install 'jax[tpu]'" in runtime.jax_tpu_problem({})
    assert "no libtpu" in runtime.jax_tpu_problem({"jax": "0.6.2"})


def test_the_tested_tensorflow_is_the_one_every_extra_installs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith(("tensorflow", "jax")) and
                   not d.startswith("tensorflow-datasets")
                   for d in project["dependencies"])  # a runtime keeps its own
    for extra, dist in (("cpu", "tensorflow"), ("gpu", "tensorflow[and-cuda]"),
                        ("tpu", "tensorflow-cpu"), ("tpu-tf", "tensorflow-tpu")):
        assert _EXTRAS[extra][0] == f"{dist}=={runtime.TF_VERSION}.*"
    assert any(d.startswith("jax") for d in _EXTRAS["cpu"])  # tests run both backends
    import tensorflow as tf
    assert tf.__version__.startswith(runtime.TF_VERSION + ".")  # what this suite ran on


@pytest.mark.parametrize("request_,tpu,where,gpus,expected", [
    ("auto", None, TPU_VM, 0, ("tpu", "local")),  # a TPU VM needs no address
    ("tpu", None, TPU_VM, 0, ("tpu", "local")),
    ("auto", "grpc://10.1.2.3:8470", CPU, 0, ("tpu", "grpc://10.1.2.3:8470")),  # a TPU node
    ("auto", None, GPU, 4, ("mirrored", None)),
    ("auto", None, GPU, 1, ("one_device", None)),
    ("auto", None, CPU, 0, ("default", None)),
    ("mirrored", None, CPU, 0, ("mirrored", None)),
])
def test_strategy_decisions_on_every_runtime(monkeypatch, request_, tpu, where, gpus,
                                             expected):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    assert distribute.choose(request_, tpu, where, gpus) == expected


def test_tpu_nodes_need_cloud_storage_and_batches_follow_replicas():
    class Resolver:
        def __init__(self, master):
            self.master = lambda: master

    assert distribute.remote_tpu(Resolver("grpc://10.1.2.3:8470"))
    assert not distribute.remote_tpu(Resolver("local")) and not distribute.remote_tpu(None)
    import tensorflow as tf
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    assert distribute.global_batch_size(1024, 128, replicas) == 128  # one replica: v5e-1
    assert distribute.global_batch_size(96, None, replicas) == 96
    with pytest.raises(ValueError, match="connect|TPU|tpu"):
        distribute.get_strategy("tpu")


# --------------------------------------------------------------------------- flagfiles


def _parse_flagfile(path: pathlib.Path) -> settings.TrainConfig:
    return settings.parse(settings.TrainConfig, [f"--flagfile={path}", "--data_dir=gs://b/d",
                                             "--model_dir=gs://b/r"])


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.cfg")),
                         ids=lambda p: p.name)
def test_flagfiles_parse_and_make_sense(path):
    from tfcdisc.learn import models
    cfg = _parse_flagfile(path)
    assert cfg.image_size >= models.BACKBONES[cfg.backbone].min_size
    text = path.read_text()
    assert "python -m tfcdisc.train --flagfile=experiments/" + path.name in text  # its command
    if path.name.endswith("_ft224.cfg"):  # a phase of the recipe it names, at 224 px
        assert cfg.phase == "ft224" and cfg.image_size == 224 and cfg.crop_area == 1.0
        assert cfg.warmup_epochs == 0 and cfg.backbone == _parse_flagfile(
            path.with_name(path.name.replace("_ft224", ""))).backbone
    if "_tpu" in path.name:
        assert cfg.strategy == "tpu" and cfg.mixed_precision == "mixed_bfloat16"
        # Fits any TPU (per-replica batches); preemptible (backups on time, whatever the rate).
        assert cfg.per_replica_batch_size and cfg.per_replica_eval_batch_size
        assert cfg.backup_every_minutes and not cfg.backup_every_steps
        assert cfg.steps_per_execution >= 32


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*_tpu.cfg")),
                         ids=lambda p: p.name)
def test_tpu_flagfiles_train_and_predict_under_xla(path):
    """What a TPU compiles, compiled with XLA on the CPU: the training step (bfloat16, uint8
    input, crops on the device) and the product prediction step, for the TPU flagfiles'
    backbones (their families' smallest members) at a small image size, on TensorFlow's
    TPUStrategy route (the second one). Dynamic shapes or ops XLA lacks fail here."""
    import keras
    import tensorflow as tf
    from tfcdisc.learn import input_pipeline, product_predictor, training
    cfg = _parse_flagfile(path)
    cfg = settings.TrainConfig(**{**cfg.__dict__, **small_model(cfg.backbone),
                                  "weights": "none", "steps_per_execution": 1})
    info = {"num_classes": 7, "num_level1": 2, "num_level2": 3}
    keras.mixed_precision.set_global_policy(cfg.mixed_precision)
    try:
        model = training.build_and_compile(cfg, info, 10, 5, batch=4, jit_compile=True)
        x = np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), np.uint8)
        y = {k: np.arange(4, dtype=np.int32) % n for k, n in
             (("label", 7), ("label_level1", 2), ("label_level2", 3)) if k in model.output}
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]), path.name
        predictor = product_predictor.ProductPredictor(model, 5, jit_compile=True)
        jpeg = tf.io.encode_jpeg(tf.constant(x[0])).numpy()
        images = tf.constant([[jpeg, jpeg, b"", b""], [jpeg, b"", b"", b""]])
        batch = {"images": input_pipeline.decode_products(images, cfg.image_size),
                 "mask": input_pipeline.padding_mask(images),
                 "product_id": tf.constant([1, 2], tf.int64), "valid": tf.ones([2])}
        out = predictor.step(batch)
        assert out["top_k_classes"].shape == (2, 5), path.name
        assert out["image_top1"].numpy()[1].tolist()[1:] == [-1, -1, -1]
    finally:
        keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- clusters


def test_two_workers_write_once_and_both_validate_everything(dataset, tmp_path):
    run = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    cfg = train_config(dataset, run, strategy="multi_worker_mirrored", epochs=2, steps_per_epoch=2)
    temps = [tmp_path / f"tmp{i}" for i in range(2)]
    procs = []
    for i, tmp in enumerate(temps):
        tmp.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(run_training(cfg, env={"TF_CONFIG": tf_config, "TMPDIR": str(tmp)},
                                  wait=False))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [last_json(out)["validation"] for out, _ in outs]
    n = dataset.info.splits["validation"].num_examples
    assert reports[0] == reports[1] and reports[0]["products"] == n  # the whole split, twice
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]  # one writer, not two
    assert json.load(open(run / "config.json"))["replicas"] == 2
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.keras", "last.keras"}
    events = [p for p in (run / "logs").rglob("*") if p.is_file()]
    assert len({p.parent for p in events}) == len(events)  # one event file per folder
    assert all(not any(t.iterdir()) for t in temps)  # the worker cleaned up after itself


def test_a_run_killed_mid_epoch_resumes_at_its_last_backup_step(dataset, tmp_path):
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=5, backup_every_steps=2,
                  log_every_steps=1)
    killed = run_training(cfg, kill_at_step=8)  # epoch 1 after 3 of its steps
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.load(open(tmp_path / "backup" / "state.json"))
    assert (state["epoch"], state["step"]) == (1, 2)  # the backup after step 7
    resumed = run_training(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = last_json(resumed.stdout)
    assert result["resumed"] == {"epoch": 1, "step": 2}
    assert "resuming" in resumed.stderr and "epoch 1, step 2" in resumed.stderr
    assert (result["first_step"], result["last_step"]) == (7, 10)  # 3 steps, not 5 or 8
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(float(r["learning_rate"]) >= 0 for r in rows)
    events = list((tmp_path / "logs" / "train").glob("*"))
    assert events  # step-level TensorBoard scalars were written


def test_a_finished_run_is_not_trained_again(dataset, tmp_path):
    cfg = train_config(dataset, tmp_path)
    assert run_training(cfg).returncode == 0
    again = run_training(cfg)
    assert again.returncode == 0 and last_json(again.stdout)["first_step"] is None
    other = run_training(train_config(dataset, tmp_path, image_size=40))
    assert other.returncode != 0 and re.search(r"--image_size=40 \(the run has 32\)",
                                               other.stderr)


def test_entry_points_import_no_tensorflow_before_their_main():
    import subprocess
    code = ("import sys, tfcdisc.train, tfcdisc.export, tfcdisc.predict, tfcdisc.evaluate, "
            "tfcdisc.show, tfcdisc.inspect, tfcdisc.synth, tfcdisc.ensemble, "
            "tfcdisc.train_fusion; print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
