"""The Colab notebook runs in smoke mode; every console command explains its flags."""

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "experiments" / "colab_tpu.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    # "Run all" on Colab runs the real workflow: smoke mode is the tests' switch only.
    assert "parameters" in code[0].metadata.get("tags", []) and "SMOKE = False" in code[0].source


# Each run is one host's branch (as its runtime's variables say) on one backend; "other"
# is a plain VM or workstation (no host variable), whose defaults are under the home folder.
# What differs by host is the set-up cell (paths, warnings, install commands, backend) and
# the preflight's target: Colab runs those and the preflight cell (skipped by the user:
# the same code as Kaggle's but for the target, which test_preflight checks per runtime);
# the pipeline after them, the same code on every host, runs whole on Kaggle (JAX, the
# preflight compiled) and on a VM (TensorFlow, the preflight skipped on a CPU runtime).
@pytest.mark.parametrize("backend,host,variable,preflight,whole", [
    ("jax", "kaggle", "KAGGLE_KERNEL_RUN_TYPE", True, True),
    ("tensorflow", "colab", "COLAB_RELEASE_TAG", False, False),
    ("tensorflow", "other", None, True, True)])
def test_notebook_runs_in_smoke_mode(backend, host, variable, preflight, whole, tmp_path,
                                     monkeypatch):
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # As papermill injects parameters; JAX on two CPU devices stands in for a TPU's chips.
    nb.cells.insert(2, nbformat.v4.new_code_cell(
        f"SMOKE = True\nBACKEND = {backend!r}\nPREFLIGHT = {preflight}"))
    if not whole:  # up to the preflight cell, without the catalogue it would not use
        last = next(i for i, c in enumerate(nb.cells) if '"tfcdisc.preflight"' in c.source)
        nb.cells = [c for c in nb.cells[:last + 1] if '"tfcdisc.synth"' not in c.source]
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "COLAB_RELEASE_TAG",
                 "COLAB_GPU", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    if variable:
        monkeypatch.setenv(variable, "Interactive")
    else:  # a VM's defaults are under its home folder
        (tmp_path / "home").mkdir()
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFCDISC_REPO", str(REPO))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "experiments")}}).execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    from tfcdisc.learn import runtime  # the same environment: the same install command
    install = runtime.install_commands(runtime.Runtime("cpu", host), str(REPO))[-1][-1]
    assert f"runtime: Runtime(accelerator='cpu', host='{host}'" in text and install in text
    # The host's own places, and a warning where the run would not outlive the session.
    assert f"paths ({host}):" in text
    if host == "kaggle":
        assert "'OUTPUT_DIR': '/kaggle/working'" in text
        assert "WARNING: /kaggle/working/runs/xception is on this Kaggle session's disk" in text
    elif host == "colab":
        assert "'RUN_DIR': '/content/drive/MyDrive/tfcdisc/runs/xception'" in text
        assert "will not outlive" not in text and "VM's disk" not in text
    else:
        assert f"'RUN_DIR': '{tmp_path}/home/tfcdisc/runs/xception'" in text
        # This home is a test's temporary folder: the VM branch warns as for any host.
        assert f"WARNING: {tmp_path}/home/tfcdisc/runs/xception is a temporary folder" in text
    assert "is deprecated" not in text  # other libraries' notices (tfds's TensorInfo.dtype)
    assert f"backend: {backend}" in text
    # Unless skipped, the preflight cell compiled the run for a v5e-1 with the TPU compiler,
    # whatever backend the notebook trains on (Kaggle is a TPU runtime; a CPU VM is not).
    if not preflight:
        assert "preflight: skipped (PREFLIGHT = False)" in text and "| train |" not in text
    elif host == "other":
        assert "preflight: skipped on this cpu runtime" in text
    else:
        assert all(f"v5e-1 | {step} |" in text for step in ("train", "validation", "predict"))
        assert "v5e-1 | train | 128 |" in text
    if not whole:
        return
    assert "validation product accuracy:" in text and "60 rows in" in text
    assert f"replicas: {2 if backend == 'jax' else 1}" in text and "_id,category_id" in text
    assert "min per epoch of 3 steps" in text  # the epoch-time estimate
    assert "kaggle competitions submit -c cdiscount-image-classification-challenge" in text
    zipped = tmp_path / "submission.csv.zip"
    import zipfile
    with zipfile.ZipFile(zipped) as z:
        rows = z.read("submission.csv").decode().splitlines()
    assert rows[0] == "_id,category_id" and len(rows) == 61
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # sample products, the learning curves, predictions


def test_the_disk_space_check_says_what_the_build_needs(tmp_path):
    from tfcdisc.learn import runtime
    bson = tmp_path / "train.bson"
    bson.write_bytes(b"x" * 1000)
    assert runtime.build_space_problem([str(bson)], str(tmp_path / "data"),
                                       free=lambda f: 2000) is None
    problem = runtime.build_space_problem([str(bson)], str(tmp_path / "data" / "new"),
                                          free=lambda f: 1000)
    assert "needs about" in problem and "gs://" in problem
    assert runtime.build_space_problem([str(bson)], "gs://b/d", free=lambda f: 0) is None


@pytest.mark.parametrize("command,flag", [
    ("synth", "--num_train_products"), ("inspect", "--errors"), ("build", "--manual_dir"),
    ("train", "--strategy"),
    ("export", "--tta"), ("ensemble", "--weights"), ("predict", "--allow_missing"),
    ("evaluate", "--labels"), ("train-fusion", "--fusion_dir"),
    ("show", "--saved_model"), ("preflight", "--target")])
def test_console_commands_explain_their_flags(command, flag):
    exe = pathlib.Path(sys.executable).parent / f"tfcdisc-{command}"
    assert exe.exists(), f"{exe}: install the project (make test does)"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0 and f"{flag}:" in out.stdout
    names = [line.split(":")[0].strip() for line in out.stdout.splitlines()
             if line.startswith("  --")]
    assert len(names) == len(set(names))  # each flag once
    assert out.stderr == ""  # no TensorFlow start-up noise: it was never imported


def test_a_flagfile_names_another_beside_it_from_any_folder(tmp_path, monkeypatch):
    """experiments/*_ft224.cfg name their recipe's flagfile by its bare name: found beside
    them, whatever the working folder (a notebook runs from experiments/); later flags
    override earlier ones, as in absl."""
    from tfcdisc import settings
    monkeypatch.chdir(tmp_path)
    cfg = settings.parse(settings.TrainConfig, [f"--flagfile={REPO}/experiments/xception_tpu_ft224.cfg",
                                           "--data_dir=d", "--model_dir=m", "--epochs=2"])
    assert (cfg.backbone, cfg.image_size, cfg.phase, cfg.epochs) == ("xception", 224, "ft224", 2)
    assert cfg.level2_loss_weight == 0.2  # from xception_tpu.cfg
    (tmp_path / "loop.cfg").write_text("--flagfile=loop.cfg\n")
    with pytest.raises(ValueError, match="includes itself"):
        settings.parse(settings.TrainConfig, [f"--flagfile={tmp_path / 'loop.cfg'}"])
