"""Exports a trained run as a self-contained SavedModel for batch inference and serving.

    python -m tfcdisc.export --model_dir=RUN --export_dir=EXPORT [--top_k=5] [--tta=flip] \
        [--duplicates_from=DATA]

The SavedModel needs neither tfcdisc nor category_names.csv (`tfcdisc.serving` says what
its signatures take and return); `tfcdisc.predict` and `tfcdisc.evaluate` read it.
"""

from __future__ import annotations

import json
from typing import Sequence

from tfcdisc import cli, config


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    from tfcdisc import serving
    f = flags.FLAGS
    try:
        summary = serving.export(f.model_dir, f.export_dir, top_k=f.top_k,
                                 checkpoint=f.checkpoint, tta=f.tta,
                                 duplicates_from=f.duplicates_from, fusion_dir=f.fusion_dir)
    except (FileNotFoundError, ValueError) as e:
        cli.fail("export", str(e))
    print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("model_dir", None, "A finished (or running) train run.", required=True)
    flags.DEFINE_string("export_dir", None, "Where to write the SavedModel (local or gs://).",
                        required=True)
    flags.DEFINE_integer("top_k", 5, "Categories per product in top_k_* outputs.",
                         lower_bound=1)
    flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "best: highest validation "
                      "product accuracy; last: the last finished epoch.")
    flags.DEFINE_enum("tta", "none", list(config.TTA_MODES), "Test-time augmentation: flip averages "
                      "each image's original and mirrored views (log-probabilities); twice "
                      "the compute, same signatures.")
    flags.DEFINE_string("fusion_dir", None, "A fusion head of this run (`tfcdisc.train_fusion`): "
                        "products are scored from their images' embeddings together.")
    flags.DEFINE_string("duplicates_from", None, "A built dataset (usually the run's "
                        "--data_dir): embed a table of its training images' exact bytes, "
                        "blended with the model where a product's image recurs, with a "
                        "weight chosen on its validation split.")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="tensorflow")


if __name__ == "__main__":
    run()
