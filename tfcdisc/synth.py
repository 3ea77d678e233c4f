"""Writes a synthetic Cdiscount-format catalogue (`tfcdisc.catalogue.synth`): the Kaggle
layout plus test_labels.csv, deterministic for a seed.

    python -m tfcdisc.synth --output_dir DIR --num_train_products N \
        --num_test_products M [--num_categories K] [--category_names CSV] [--seed S]
"""

from __future__ import annotations

import json

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.SynthSettings) -> None:
    from tfcdisc.catalogue import synth
    summary = synth.generate(f.output_dir, f.num_train_products, f.num_test_products,
                             num_categories=f.num_categories,
                             category_names=f.category_names, seed=f.seed,
                             workers=f.workers, verbose=True, difficulty=f.difficulty,
                             overwrite=f.overwrite)
    print(json.dumps(summary, indent=2))


run = cli.command("synth", settings.SynthSettings, main, __doc__,
                  after_stop="{output_dir} holds a partial catalogue: rerun the same "
                  "command with --overwrite")


if __name__ == "__main__":
    run()
