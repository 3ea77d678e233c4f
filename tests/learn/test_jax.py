"""Keras 3 on JAX, as on today's TPU runtimes, checked on two CPU devices: XLA compiles
every step as it would for a TPU's cores (XLA_FLAGS=--xla_force_host_platform_device_count=2
in each JAX process). TensorFlow still feeds the data and writes the SavedModel."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import (REPO, free_ports, last_json, once_per_run, run_training,
                      serve_without_tfcdisc, slots, small_model, train_config)
from tfcdisc import settings

_DEVICES = "--xla_force_host_platform_device_count=2"


def _flagfile_config(path, dataset, model_dir):
    cfg = settings.parse(settings.TrainConfig, [f"--flagfile={path}", f"--data_dir={dataset.data_dir}",
                                            f"--model_dir={model_dir}"])
    return settings.TrainConfig(**{**cfg.__dict__, **small_model(cfg.backbone), "decode_size": 48,
                                 "weights": "none", "strategy": "default", "epochs": 1,
                                 "steps_per_epoch": 2, "per_replica_batch_size": 4,
                                 "steps_per_execution": 2, "eval_batch_size": 16,
                                 "eval_max_batches": 1, "backup_every_steps": None,
                                 "shuffle_buffer": 64, "verbose": 0, "seed": 0})


@pytest.mark.parametrize("flagfile", ["demo_cpu.cfg", "xception_tpu.cfg",
                                      "efficientnetv2_s_tpu.cfg"])
def test_flagfile_backbones_train_under_jax_on_two_devices(flagfile, dataset, tmp_path):
    """The demo flagfile and the TPU flagfiles' backbones (their families' smallest
    members; bfloat16 where they say so, uint8 input, crops on the device,
    steps_per_execution) train and validate on two devices; the run records its
    backend."""
    cfg = _flagfile_config(REPO / "experiments" / flagfile, dataset, tmp_path)
    done = run_training(cfg, backend="jax")
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done.stdout)
    assert result["distribution"] == "backend jax, DataParallel over 2 cpu devices"
    assert result["global_batch_size"] == 8  # 4 per device
    assert np.isfinite(result["loss"]).all()
    assert result["validation"]["products"] == dataset.info.splits["validation"].num_examples
    run = json.load(open(tmp_path / "config.json"))
    assert run["backend"] == "jax" and run["replicas"] == 2
    assert run["distribution"] == result["distribution"]
    if flagfile.endswith("_tpu.cfg"):
        assert run["policy"] == "mixed_bfloat16"
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "history.csv"))] == ["0"]


def test_a_jax_run_killed_mid_epoch_resumes_at_its_last_backup_step(dataset, tmp_path):
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=5, backup_every_steps=2,
                       log_every_steps=1)
    killed = run_training(cfg, kill_at_step=8, backend="jax")  # epoch 1 after 3 steps
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.load(open(tmp_path / "backup" / "state.json"))
    assert (state["epoch"], state["step"]) == (1, 2)  # the backup after step 7
    resumed = run_training(cfg, backend="jax")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = last_json(resumed.stdout)
    assert result["resumed"] == {"epoch": 1, "step": 2}
    assert (result["first_step"], result["last_step"]) == (7, 10)  # 3 steps, not 5 or 8
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert list((tmp_path / "logs" / "train").glob("*"))  # TensorBoard scalars


def test_a_run_killed_on_tensorflow_resumes_on_jax(dataset, tmp_path):
    """Checkpoints and backups are Keras files, the same under both backends."""
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=3, backup_every_steps=2)
    killed = run_training(cfg, kill_at_step=5)  # TensorFlow, epoch 1 after 2 steps
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_training(cfg, backend="jax")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = last_json(resumed.stdout)
    assert result["resumed"] == {"epoch": 1, "step": 2}
    assert (result["first_step"], result["last_step"]) == (5, 6)
    assert json.load(open(tmp_path / "config.json"))["backend"] == "jax"
    assert [r["epoch"] for r in csv.DictReader(open(tmp_path / "history.csv"))] == ["0", "1"]


def test_two_jax_processes_train_as_one_and_only_process_0_writes(dataset, tmp_path):
    """Multi-host JAX (a TPU pod's hosts) as two processes on 127.0.0.1, one CPU device
    each: one global batch, the same weights in both, every product validated by both,
    the run's files written once."""
    run = tmp_path / "run"
    cfg = train_config(dataset, run, strategy="multi_worker_mirrored", epochs=2,
                       steps_per_epoch=2)
    addresses = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    procs, temps = [], []
    for i in range(2):
        temps.append(tmp_path / f"tmp{i}")
        temps[-1].mkdir()
        procs.append(run_training(cfg, backend="jax", wait=False, env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": addresses,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(i),
            "TMPDIR": str(temps[-1])}))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [last_json(out) for out, _ in outs]
    assert all(r["distribution"] == "backend jax, DataParallel over 2 cpu devices in 2 "
               "processes" for r in results)
    assert results[0]["weights_abs_sum"] == results[1]["weights_abs_sum"]  # one model
    assert results[0]["loss"] == results[1]["loss"]  # the global batch's loss
    n = dataset.info.splits["validation"].num_examples
    assert results[0]["validation"] == results[1]["validation"]
    assert results[0]["validation"]["products"] == n
    assert [r["epoch"] for r in csv.DictReader(open(run / "history.csv"))] == ["0", "1"]
    assert json.load(open(run / "config.json"))["replicas"] == 2
    assert all(not any(t.iterdir()) for t in temps)  # process 1 cleaned up after itself


@pytest.fixture(scope="module")
def jax_run(dataset, tmp_path_factory):
    """A small run trained under JAX on two devices, and its export (TensorFlow)."""
    def make(folder):
        from tfcdisc.serve import exporting
        run, out = folder / "run", folder / "export"
        done = run_training(train_config(dataset, run, epochs=2, steps_per_epoch=6),
                            backend="jax")
        assert done.returncode == 0, done.stderr[-3000:]
        exporting.export(str(run), str(out))
        return run, out
    return once_per_run(tmp_path_factory, "jax_run", make)


def _graph_ops(export_dir) -> set:
    from tensorflow.core.protobuf import saved_model_pb2
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((pathlib.Path(export_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for graph in sm.meta_graphs:
        ops |= {n.op for n in graph.graph_def.node}
        for f in graph.graph_def.library.function:
            ops |= {n.op for n in f.node_def}
    return ops


_JAX_SCORES = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np, tensorflow as tf
from tfcdisc.learn import input_pipeline, product_predictor, rundir
images = [[bytes.fromhex(b) for b in p] for p in json.loads(sys.stdin.read())]
model = rundir.float32_model(sys.argv[1])
batches = input_pipeline.batch_products(tf.data.Dataset.from_tensor_slices(
    {{"images": tf.constant(images)}}), 4, 32, len(images))
out = product_predictor.ProductPredictor(model, 5)(batches)
print(json.dumps({{k: out[k].tolist() for k in ("top_k_classes", "top_k_probabilities")}}))
"""


def test_a_jax_run_exports_a_plain_tensorflow_savedmodel_that_agrees_with_it(
        jax_run, catalogue):
    from tfcdisc.catalogue import bsonfile
    from tfcdisc.learn import rundir
    run, export = jax_run
    ops = _graph_ops(export)
    assert "XlaCallModule" not in ops and "StatefulPartitionedCall" in ops
    folder, _ = catalogue
    products = list(bsonfile.iter_products(str(folder / "test.bson")))[:10]
    images = [slots(p.images) for p in products]
    served = serve_without_tfcdisc(export, images)  # neither tfcdisc nor jax importable
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": _DEVICES}
    done = subprocess.run([sys.executable, "-c", _JAX_SCORES.format(repo=str(REPO)),
                           rundir.checkpoint_path(str(run))], capture_output=True, text=True,
                          input=json.dumps([[b.hex() for b in p] for p in images]),
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    on_jax = last_json(done.stdout)
    ids = np.array(json.loads(served["taxonomy"])["category_ids"])
    assert served["top_k_category_id"] == ids[np.array(on_jax["top_k_classes"])].tolist()
    np.testing.assert_allclose(served["top_k_probability"], on_jax["top_k_probabilities"],
                               rtol=1e-4, atol=1e-5)


def _command(name, *flags, backend):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["XLA_FLAGS"] = _DEVICES  # tfcdisc's --backend flag chooses
    done = subprocess.run([sys.executable, "-m", f"tfcdisc.{name}", *flags,
                           f"--backend={backend}"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_predict_and_evaluate_under_jax_equal_tensorflow(jax_run, catalogue, tmp_path):
    """The same export, the same products, both backends: the same submission (only a
    tie broken differently could differ) and the same report."""
    folder, _ = catalogue
    _, export = jax_run
    outputs = {}
    for backend in ("jax", "tensorflow"):
        out = tmp_path / f"{backend}.csv"
        stats = _command("predict", f"--saved_model={export}",
                         f"--bson={folder / 'test.bson'}", f"--output={out}",
                         "--batch_size=16", backend=backend)
        assert stats["replicas"] == (2 if backend == "jax" else 1)
        outputs[backend] = out.read_text()
    assert outputs["jax"] == outputs["tensorflow"]
    reports = [_command("evaluate", f"--saved_model={export}", f"--bson={folder / 'test.bson'}",
                        f"--labels={folder / 'test_labels.csv'}", backend=backend)
               for backend in ("jax", "tensorflow")]
    for key in ("product_accuracy", "image_accuracy", "top5_accuracy", "products"):
        assert reports[0][key] == pytest.approx(reports[1][key]), key
