"""Trains an image classifier on the TFDS `cdiscount` dataset.

    python -m tfcdisc.train --flagfile=experiments/demo_cpu.cfg --data_dir=DATA \
        --model_dir=RUN [any flag to override]

Writes flags.txt, config.json, checkpoints/{best,last}.keras, history.csv, TensorBoard
logs and a backup to the model dir; rerunning the same command after a crash or a
preemption resumes at the last backup (every --backup_every_steps steps, and after each
epoch). Prints the last validation report as JSON.
"""

from __future__ import annotations

import json
from typing import Sequence

from tfcdisc import cli, config


def _define_flags() -> None:
    config.define_flags(config.TrainConfig)


def main(argv: Sequence[str]) -> None:
    del argv
    from tfcdisc import training
    cfg = config.from_flags(config.TrainConfig)
    try:
        result = training.train(cfg, flags_text=cli.flags_text())
    except (ValueError, FileNotFoundError) as e:
        cli.fail("train", str(e))
    except OSError as e:  # a full disk, a read-only folder: what was complete is kept
        cli.fail("train", f"{e}; the last complete checkpoint and backup are kept: fix it "
                 "and rerun the same command to resume")
    print(json.dumps({"distribution": result["distribution"],
                      "validation": result["validation"], "resumed": result["resumed"],
                      "global_batch_size": result["global_batch_size"]}, indent=2))


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()
