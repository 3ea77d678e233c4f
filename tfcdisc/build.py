"""Builds the TFDS `cdiscount` dataset from a Kaggle folder: `tfds build` of
tfds_builder/cdiscount, from any folder, quietly.

    python -m tfcdisc.build --manual_dir=KAGGLE --data_dir=DATA [--config=NAME|JSON] \
        [--overwrite] [--beam_pipeline_options=...]

The same build as `tfds build tfds_builder/cdiscount --manual_dir ... --data_dir ...` (run
from the clone's folder) or `tfds build --imports=tfds_builder.cdiscount.cdiscount_dataset_builder
cdiscount ...` (from any folder), which it runs, without their noise: the CUDA probe
and TensorFlow's start-up lines, apitools warnings, TFDS's info lines and its ~170-line
dataset description are left out (`--verbosity=0` or higher brings them back); the
progress bars, warnings about the data and errors stay. Ends with one line per split.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tfcdisc import cli
from tfcdisc import settings

BUILDER = "tfds_builder.cdiscount.cdiscount_dataset_builder"
# Lines of stderr a quiet build leaves out: the tfds command's INFO lines, Python-level
# notices of libraries the build does not use, a TFDS note on the folder it is making.
_APITOOLS = "WARNING:root:apitools"
_NOISE = ("INFO[", _APITOOLS, "WARNING[file_utils.py]: Variant folder",
          "Downloading and preparing dataset", "Dataset cdiscount downloaded and prepared")


def tfds_command(f: settings.BuildSettings) -> list[str]:
    """The `tfds build` command line this build runs."""
    tfds = os.path.join(os.path.dirname(sys.executable), "tfds")
    args = [tfds if os.path.exists(tfds) else "tfds", "build", f"--imports={BUILDER}",
            "cdiscount", f"--manual_dir={f.manual_dir}", f"--data_dir={f.data_dir}"]
    if f.config:
        args.append(f"--config={f.config}")
    if f.overwrite:
        args.append("--overwrite")
    if f.beam_pipeline_options:
        args.append(f"--beam_pipeline_options={f.beam_pipeline_options}")
    return args


def main(f: settings.BuildSettings) -> None:
    from absl import flags
    loud = flags.FLAGS["verbosity"].present
    if not loud:  # before TensorFlow starts, in the build and in the summary here
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.Popen(tfds_command(f), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _relay(proc.stderr.fileno(), loud)
    except KeyboardInterrupt:  # the child got the same Ctrl-C: it says what it kept
        _relay(proc.stderr.fileno(), loud)
        proc.wait()
        raise
    out = proc.stdout.read().decode(errors="replace")
    if proc.wait():
        sys.exit(proc.returncode)
    if loud:
        sys.stdout.write(out)
    _summary(f.data_dir, f.config)


def _relay(fd: int, loud: bool) -> None:
    """The child's stderr to ours as it comes (progress bars redraw with a carriage
    return, so pieces end at \r or \n), its noise left out unless ``loud``."""
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        pending += chunk
        pieces = pending.replace(b"\r", b"\r\0").replace(b"\n", b"\n\0").split(b"\0")
        pending = pieces.pop() if chunk else b""
        for piece in pieces + ([pending] if not chunk and pending else []):
            text = piece.decode(errors="replace")
            if not loud and _APITOOLS in text.strip()[1:]:  # a worker's, after a bar
                text = text[:text.index(_APITOOLS)]
            if loud or not text.strip().startswith(_NOISE):
                sys.stderr.write(text)
        sys.stderr.flush()
        if not chunk:
            return


def _summary(data_dir: str, config: str | None) -> None:
    """One line per split of the finished build."""
    import json
    from tfcdisc.learn import input_pipeline
    name = json.loads(config)["name"] if config and config.lstrip().startswith("{") else config
    builder = input_pipeline.load_builder(data_dir, name)
    print(f"built {builder.data_dir}")
    for split, info in sorted(builder.info.splits.items()):
        print(f"  {split}: {info.num_examples:,} products in {len(info.filenames)} files")


run = cli.command("build", settings.BuildSettings, main, __doc__,
                  after_stop="no dataset was written (TFDS moves a build into place only "
                  "when whole): rerun the same command")


if __name__ == "__main__":
    run()
