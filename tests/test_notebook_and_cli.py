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
    assert "parameters" in code[0].metadata.get("tags", []) and "SMOKE = True" in code[0].source


def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("TFCDISC_REPO", str(REPO))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "experiments")}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "validation product accuracy:" in text and "60 rows in" in text


@pytest.mark.parametrize("command,flag", [
    ("synth", "--num_train_products"), ("inspect", "--errors"), ("train", "--strategy"),
    ("export", "--top_k"), ("predict", "--top_k_output"), ("evaluate", "--labels")])
def test_console_commands_explain_their_flags(command, flag):
    exe = pathlib.Path(sys.executable).parent / f"tfcdisc-{command}"
    assert exe.exists(), f"{exe}: install the project (make test does)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert f"{flag}:" in out.stdout  # absl exits --help with status 1
