"""Training: strategies, precision, inference-mode parity, resume after a crash."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import keras
import pytest

from conftest import (REPO, epoch_scalars, last_json, product_batches, run_training,
                      train_config)
from tfcdisc.learn import distribute, product_predictor, training


# Longer runs than conftest's default: a larger batch, warm-up, decay, smoothing.
_LEARNS = dict(global_batch_size=32, steps_per_epoch=4, warmup_epochs=0.2, weight_decay=1e-4,
               label_smoothing=0.1, shuffle_buffer=512, decode_size=180)


def _config(dataset, model_dir, **overrides):
    return train_config(dataset, model_dir, **{**_LEARNS, **overrides})


def _inference_accuracy(dataset, model, image_size):
    """Image accuracy on the training split, in inference mode (moving BN statistics)."""
    ds = product_batches(dataset, "train", 32, image_size)
    return product_predictor.accuracy_report(product_predictor.ProductPredictor(model)(ds))


def test_short_run_evaluates_in_inference_mode_as_well_as_it_trains(dataset, tmp_path):
    result = training.train(_config(dataset, tmp_path, epochs=5, steps_per_epoch=14,
                                 level1_loss_weight=0.2, level2_loss_weight=0.2))
    train_accuracy = result.history["label_accuracy"][-1]
    assert train_accuracy > 0.6  # it learned
    # The same images score about as well with moving BatchNorm statistics (inference)
    # as with batch statistics (training).
    inference = _inference_accuracy(dataset, result.model, 32)
    assert inference["image_accuracy"] >= train_accuracy - 0.1
    validation = result.validation
    assert validation["products"] == dataset.info.splits["validation"].num_examples
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "history.csv", "checkpoints", "logs"} <= files
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"best.keras", "last.keras"}
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert "val_product_accuracy" in rows[0] and "val_top5_accuracy" in rows[0]
    best = keras.saving.load_model(tmp_path / "checkpoints" / "best.keras")
    assert set(best.output) == {"label", "label_level1", "label_level2"}
    # Curves: a point per epoch, though 14 steps are no multiple of --log_every_steps=100.
    train_curves = epoch_scalars(tmp_path / "logs" / "train")
    assert train_curves["epoch_loss"] == [0, 1, 2, 3, 4]
    assert train_curves["epoch_learning_rate"] == [0, 1, 2, 3, 4]
    assert epoch_scalars(tmp_path / "logs" / "validation")["epoch_product_accuracy"] == \
        [0, 1, 2, 3, 4]


def test_default_batchnorm_momentum_lags_in_short_runs(dataset, tmp_path):
    """The control for the test above: Keras's default momentum (0.99) after 70 steps
    leaves the moving statistics far from the weights, and inference mode suffers."""
    result = training.train(_config(dataset, tmp_path, epochs=5, steps_per_epoch=14,
                                 bn_momentum=None))
    history = result.history  # one head: Keras drops the "label_" prefix
    train_accuracy = history.get("label_accuracy", history.get("accuracy"))[-1]
    inference = _inference_accuracy(dataset, result.model, 32)
    assert inference["image_accuracy"] < train_accuracy - 0.2


class _Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("preempted")


class _Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def test_a_run_killed_after_its_first_epoch_resumes_at_epoch_1(dataset, tmp_path):
    cfg = _config(dataset, tmp_path, epochs=3, steps_per_epoch=3)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, callbacks=[_Crash()])
    epochs = _Epochs()
    training.train(cfg, callbacks=[epochs])
    assert epochs.seen == [1, 2]
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]


def test_mixed_bfloat16_trains_on_cpu(dataset, tmp_path):
    # oneDNN's bfloat16 CPU kernels can return NaN gradients (a CPU-library bug; a TPU
    # compiles with XLA, which the JAX tests run): the plain TensorFlow kernels here.
    out = run_training(_config(dataset, tmp_path, mixed_precision="mixed_bfloat16"),
                       env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.load(open(tmp_path / "config.json"))["policy"] == "mixed_bfloat16"
    assert all(v == v for v in last_json(out.stdout)["loss"])  # finite, not NaN


def test_mirrored_strategy_on_two_logical_cpus(dataset, tmp_path):
    cfg = _config(dataset, tmp_path, strategy="mirrored", steps_per_epoch=3,
                  per_replica_batch_size=16)
    out = run_training(cfg, logical_cpus=2)
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["replicas"] == 2 and saved["strategy"] == "MirroredStrategy"
    assert result["global_batch_size"] == saved["global_batch_size"] == 32  # 16 x 2 replicas
    assert len(result["loss"]) == 1
    assert result["validation"]["products"] == dataset.info.splits["validation"].num_examples


def test_strategy_and_precision_choices_explain_impossible_combinations(monkeypatch):
    with pytest.raises(ValueError, match="unknown strategy 'gpu'"):
        distribute.get_strategy("gpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribute.get_strategy("multi_worker_mirrored")
    with pytest.raises(ValueError, match="use --strategy=tpu"):
        distribute.get_strategy("mirrored", tpu="grpc://10.0.0.1:8470")
    with pytest.raises(ValueError, match="no TPU found"):
        distribute.get_strategy("tpu")
    strategy = distribute.get_strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.set_precision("auto", strategy) == "float32"
    with pytest.raises(ValueError, match="unknown mixed precision"):
        distribute.set_precision("float64", strategy)


def test_cli_writes_flags_and_reports(dataset, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tfcdisc.train", f"--flagfile={REPO}/experiments/demo_cpu.cfg",
         f"--data_dir={dataset.data_dir}", f"--model_dir={tmp_path}", "--epochs=1",
         "--steps_per_epoch=2", "--image_size=32", "--verbose=0"],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""  # no start-up noise unless --verbosity is given
    flags_txt = (tmp_path / "flags.txt").read_text().splitlines()
    assert "--backbone=small_cnn" in flags_txt and "--epochs=1" in flags_txt
    names = [line.split("=")[0] for line in flags_txt]
    assert len(names) == len(set(names)) and "--helpfull" not in names  # each flag once
    assert json.loads(out.stdout[out.stdout.index("{"):])["validation"]["products"] > 0
    bad = subprocess.run(
        [sys.executable, "-m", "tfcdisc.train", f"--data_dir={dataset.data_dir}",
         f"--model_dir={tmp_path / 'x'}", "--backbone=xception", "--image_size=32"],
        capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "xception needs --image_size >= 71" in bad.stderr


def test_the_keras_internals_the_multi_worker_build_relies_on_are_still_there():
    """`training._build_for_multi_worker` is the one place tfcdisc calls Keras internals
    (MultiWorkerMirroredStrategy's fit cannot build a model whose inputs are uint8). Keras
    is pinned to the tested range; this fails first when a Keras release changes them."""
    import inspect
    import re
    import tomllib
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
    assert "data_batch" in inspect.signature(keras.Model._symbolic_build).parameters
    assert set(inspect.signature(keras.Model._maybe_symbolic_build).parameters) == {
        "self", "iterator", "data_batch"}
    fit = inspect.getsource(TensorFlowTrainer.fit)
    assert "self._maybe_symbolic_build(iterator=" in fit  # what the workaround disarms
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("keras"))
    low, high = re.match(r"keras>=([\d.]+),<([\d.]+)", spec).groups()
    version = tuple(int(p) for p in keras.__version__.split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    # Everything else is public: no other module reaches into Keras.
    for path in (REPO / "tfcdisc").glob("*.py"):
        text = path.read_text()
        if path.name != "training.py":
            assert "_symbolic_build" not in text and "keras.src" not in text, path.name


def test_time_based_backups_come_when_the_minutes_are_up(tmp_path):
    """--backup_every_minutes: a backup once the time has passed, counted from the last
    backup, whatever the step count; state.json records the batch its steps count in."""
    import json

    import keras

    from tfcdisc.learn import training
    now = [0.0]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    backup = training.Backup(str(tmp_path / "backup"), None, None, every_minutes=1.0,
                             global_batch_size=64, clock=lambda: now[0])
    backup.set_model(model)
    backup.set_params({"steps": 100})
    backup.on_epoch_begin(0)
    for step, t in enumerate([10, 50, 61, 70, 125]):
        now[0] = t
        backup.on_train_batch_end(step)
        if step == 1:
            assert not (tmp_path / "backup" / "state.json").exists()
    state = json.loads((tmp_path / "backup" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["global_batch_size"]) == (0, 5, 64)
    assert [p.name for p in (tmp_path / "backup").glob("*.h5")] == ["epoch0-step5.weights.h5"]
    votes = []
    agreed = training.Backup(str(tmp_path / "b2"), None, None, every_minutes=1.0,
                             clock=lambda: now[0], agree=lambda due: votes.append(due) or False)
    agreed.set_model(model)
    agreed.set_params({"steps": 100})
    now[0] = 1000
    agreed.on_train_batch_end(0)  # this process's minutes are up, process 0's are not
    assert votes == [True] and not (tmp_path / "b2").exists()


@pytest.mark.parametrize("step,before,after,expected", [
    (800, 128, 1024, 100), (0, 128, 1024, 0), (100, 1024, 128, 799), (5, 64, 64, 5)])
def test_a_backup_position_is_rescaled_to_the_new_global_batch(step, before, after, expected):
    from tfcdisc.learn import training
    epoch, moved, said = training.rescaled_position(
        {"epoch": 2, "step": step, "global_batch_size": before}, after, 800, None)
    assert (epoch, moved) == (2, expected)
    assert (said is None) == (before == after)


def test_a_run_moved_to_twice_the_replicas_resumes_where_its_images_were(dataset, tmp_path):
    """Killed on one replica (4 images a step), resumed on two logical CPUs (8 a step):
    the position is counted in images, the step counter moves with it, and it says so."""
    import csv
    import json
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=6, backup_every_steps=2,
                       global_batch_size=16, per_replica_batch_size=4)
    killed = run_training(cfg, kill_at_step=11)  # epoch 1 after 5 steps: backup at step 4
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((tmp_path / "backup" / "state.json").read_text())["step"] == 4
    moved = dataclasses.replace(cfg, strategy="mirrored")
    resumed = run_training(moved, logical_cpus=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1 step 4 of 4 images is resumed as step 2 of 8" in resumed.stderr
    assert "resuming" in resumed.stderr and "at epoch 1, step 2" in resumed.stderr
    result = last_json(resumed.stdout)
    assert result["global_batch_size"] == 8 and result["resumed"] == {"epoch": 1, "step": 4}
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_jit_compile_compiles_the_tensorflow_step_and_names_what_it_cannot(dataset,
                                                                          tmp_path):
    """--jit_compile: the TensorFlow training step under XLA (Keras's own "auto" leaves it
    off on a CPU and under every strategy); under MirroredStrategy over logical CPUs,
    which TensorFlow cannot compile, one line before anything is written."""
    assert training.jit_compile_for(None) == "auto" and training.jit_compile_for(True) is True
    cfg = train_config(dataset, tmp_path / "xla", jit_compile=True, steps_per_epoch=2)
    done = run_training(cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(map(math.isfinite, last_json(done.stdout)["loss"]))
    mirrored = train_config(dataset, tmp_path / "mirrored", strategy="mirrored",
                            jit_compile=True, global_batch_size=8)
    refused = run_training(mirrored, logical_cpus=2)
    assert refused.returncode != 0
    assert "--jit_compile under a mirrored strategy needs GPUs" in refused.stderr
    assert not (tmp_path / "mirrored").exists()


def test_a_full_frame_phase_starts_from_the_runs_best_at_another_size(dataset, tmp_path):
    """A fine-tune phase (`--phase`): the run's best checkpoint at 32 px carries into a
    48 px model; the phase keeps its own files in the run; export takes the phase's best."""
    import numpy as np
    from tfcdisc.learn import training
    from tfcdisc.serve import exporting
    run = tmp_path / "run"
    training.train(train_config(dataset, run, image_size=32))
    main_history = (run / "history.csv").read_text()
    best = keras.saving.load_model(run / "checkpoints" / "best.keras", compile=False)
    # A learning rate of 0: the phase's weights are exactly where it started.
    training.train(train_config(dataset, run, image_size=48, crop_area=1.0, phase="ft48",
                                learning_rate=0.0, warmup_epochs=0))
    phase = run / "phases" / "ft48"
    assert sorted(p.name for p in (phase / "checkpoints").iterdir()) == ["best.keras",
                                                                          "last.keras"]
    assert len((phase / "history.csv").read_text().splitlines()) == 2
    assert (run / "history.csv").read_text() == main_history
    tuned = keras.saving.load_model(phase / "checkpoints" / "best.keras", compile=False)
    assert tuned.get_layer("view").size == 48
    for a, b in zip(best.trainable_weights, tuned.trainable_weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    summary = exporting.export(str(run), str(tmp_path / "export"), phase="ft48")
    assert summary["image_size"] == 48
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        training.train(train_config(dataset, tmp_path / "fresh", phase="ft48"))


def test_the_best_checkpoint_goes_to_the_later_epoch_on_a_tie(tmp_path):
    """Validation accuracy 0.9, 1.0, 1.0, 0.95: epoch 2 is kept, not epoch 1."""
    import numpy as np
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = training.WholeCheckpoint(str(tmp_path / "best.keras"),
                                    monitor="val_product_accuracy", mode="max",
                                    save_best_only=True)
    best.set_model(model)
    for epoch, accuracy in enumerate([0.9, 1.0, 1.0, 0.95]):
        model.layers[0].bias.assign([float(epoch)])
        best.on_epoch_end(epoch, {"val_product_accuracy": accuracy})
    kept = keras.saving.load_model(tmp_path / "best.keras", compile=False)
    np.testing.assert_array_equal(kept.layers[0].bias.numpy(), [2.0])
