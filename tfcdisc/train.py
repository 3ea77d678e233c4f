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

from tfcdisc import cli
from tfcdisc import settings


def main(cfg: settings.TrainConfig) -> None:
    from tfcdisc.learn import training
    result = training.train(cfg, flags_text=cli.flags_text())
    print(json.dumps({"distribution": result.distribution,
                      "validation": result.validation, "resumed": result.resumed,
                      "global_batch_size": result.global_batch_size}, indent=2))


# A full disk, a read-only folder: what was complete is kept.
run = cli.command("train", settings.TrainConfig, main, __doc__, backend="flag",
                  after_os_error="the last complete checkpoint and backup are kept: fix it "
                  "and rerun the same command to resume",
                  after_stop="the checkpoints and the last backup in {model_dir} are kept "
                  "(one after every epoch, and every --backup_every_steps or "
                  "--backup_every_minutes): rerun the same command to resume there")


if __name__ == "__main__":
    run()
