"""The preflight: a run's steps compiled by the real TPU compiler for described TPU slices
(libtpu, installed with the tests' extra), with no TPU present."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

_SMALL = ["--backbone=small_cnn", "--image_size=32", "--decode_size=32", "--weights=none",
          "--per_replica_batch_size=16", "--per_replica_eval_batch_size=8",
          "--mixed_precision=auto", "--level1_loss_weight=0.2", "--epochs=2"]


def _preflight(*args, data_dir=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command quiets TensorFlow itself
    cmd = [sys.executable, "-m", "tfcdisc.preflight", *_SMALL, *args]
    if data_dir:
        cmd.append(f"--data_dir={data_dir}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_training_and_validation_steps_compile_for_v5e_1_and_v5e_8(dataset, tmp_path):
    out = tmp_path / "preflight.json"
    run = _preflight("--target=v5e-1", "--target=v5e-8", f"--output={out}",
                     "--steps=validation,train", data_dir=dataset.data_dir)
    assert run.returncode == 0, run.stderr
    rows = {(r["target"], r["step"]): r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [(t, s) for t in ("v5e-1", "v5e-8") for s in ("train", "validation")]
    for r in rows.values():
        assert r["fits"] and 0 < r["needed_gib"] < r["hbm_gib"] == 16
        assert r["gflops"] > 0 and r["compile_seconds"] > 0
    one, eight = rows[("v5e-1", "train")], rows[("v5e-8", "train")]
    # The global batch is 8x on a v5e-8 and split over its chips: each chip's FLOPs and
    # images stay those of one chip (the step's all-reduce adds little), and the epoch
    # bound falls with the chips.
    assert eight["gflops"] == pytest.approx(one["gflops"], rel=0.1)
    assert eight["epoch_hours"][0] == pytest.approx(one["epoch_hours"][0] / 8, rel=0.15)
    assert eight["host_images_per_s"] == pytest.approx(8 * one["host_images_per_s"], rel=0.15)
    assert rows[("v5e-1", "validation")]["batch_per_chip"] == 8
    assert "v5e-8 | train | 16 |" in run.stdout  # the printed table
    assert run.stderr == ""  # libtpu's notices about a missing TPU VM are held back


def test_an_eval_batch_that_does_not_fit_is_refused_with_the_flag_that_fixes_it(dataset):
    """Only the step the change touched is compiled (--steps), then its fix."""
    run = _preflight("--target=v5e-1", "--per_replica_eval_batch_size=131072",
                     "--image_size=64", "--decode_size=64", "--steps=validation",
                     data_dir=dataset.data_dir)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("preflight: v5e-1: the validation step needs ") and \
        "GiB per chip, 15.75 GiB available: pass --per_replica_eval_batch_size=" in line
    fixed = int(line.split("--per_replica_eval_batch_size=")[1].split()[0])
    assert 8 <= fixed < 131072 and "it fits" in line and "more: see the table" not in line
    assert "v5e-1 | validation | 131072 |" in run.stdout and "| NO |" in run.stdout
    assert "| train |" not in run.stdout and "| predict |" not in run.stdout


def test_an_unknown_step_is_refused_before_any_compile():
    run = _preflight("--target=v5e-1", "--steps=validation,eval")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == (
        "preflight: --steps=validation,eval: no step eval; choose from train, validation, "
        "predict")


def test_the_missing_compiler_names_the_install(monkeypatch):
    import importlib.util
    from importlib.metadata import version
    from tfcdisc.learn import preflight
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    problem = preflight.tpu_compiler_problem()
    assert f'pip install "jax[tpu]=={version("jax")}"' in problem


def test_targets_are_named_as_runtimes_name_them():
    from tfcdisc.learn import targets
    assert targets.for_accelerator_type("v5litepod-8") == "v5e-8"
    assert targets.for_accelerator_type("v6e-8") == "v6e-8"
    assert targets.for_accelerator_type("v2-8") is None
    with pytest.raises(ValueError, match="choose from v5e-1"):
        targets.get("v9-8")
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (18.31G) exceeds available HBM (15.75G)")
    assert targets.out_of_memory(message) == (18.31, 15.75)
    assert targets.out_of_memory("INVALID_ARGUMENT: something else") is None


@pytest.mark.parametrize("start,largest,expected", [
    (1000, False, 272), (1000, True, 304), (128, True, 304), (64, False, 64)])
def test_the_eval_batch_fit_searches_with_compiles(start, largest, expected, monkeypatch):
    """`Preflight.fit` over a stand-in for the compiler where 4 MiB a product fits 1.2 GiB
    (307 products): from a failure, the estimate from the bytes with a 10% margin (1000 x
    1.2 / 3.9 x 0.9, to a multiple of 8: 272), checked by a compile; with
    ``largest`` (--fit_eval_batch), the largest multiple of 8 that fits, from either side."""
    from tfcdisc.learn import preflight
    from tfcdisc.settings import TrainConfig
    pre = preflight.Preflight(TrainConfig(data_dir="-", model_dir="-"))
    compiled = []

    def step(target, step, batch):
        compiled.append(batch)
        needed = batch * 4 / 1024
        return preflight.StepReport("v5e-1", step, batch, needed <= 1.2, 1.2, needed)

    monkeypatch.setattr(pre, "step", step)
    size, report = pre.fit(None, "validation", start, largest=largest)
    assert size == expected and report.fits and report.batch_per_chip == expected
    assert all(b % 8 == 0 for b in compiled) and len(compiled) < 16


def test_without_a_target_a_tpu_vm_compiles_for_its_own_type(monkeypatch):
    from tfcdisc import preflight as command
    from tfcdisc.learn import targets
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    assert command._targets(None) == [targets.TARGETS["v5e-8"]]
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v2-8")  # not in the table: its own chips
    assert command._targets(None) == [None]
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    for name in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.path.exists", lambda p: False)
    with pytest.raises(ValueError, match="not on a TPU VM: name where the run would train"):
        command._targets(None)
    assert command._targets(["local", "v6e-8"]) == [None, targets.TARGETS["v6e-8"]]
    assert targets.for_runtime("tpu", "colab") == "v5e-1"
    assert targets.for_runtime("tpu", "kaggle", "v5litepod-8") == "v5e-8"
    assert targets.for_runtime("gpu", "colab") is None


def test_a_local_chip_is_known_by_its_device_kind():
    from tfcdisc.learn import targets
    assert targets.peak_of_device_kind("TPU v5 lite") == 197
    assert targets.peak_of_device_kind("TPU v5") == 459  # a v5p, not a v5e
    assert targets.peak_of_device_kind("TPU v6 lite") == 918
    assert targets.peak_of_device_kind("TPU v4") == 275
    assert targets.peak_of_device_kind("TPU v9") == 197
