"""Trains a product-level fusion head on a finished run's frozen image model.

    python -m tfcdisc.train_fusion --model_dir=RUN --fusion_dir=FUSION [--data_dir=DATA] \
        [--epochs=10] [--batch_size=256] [--learning_rate=0.001]
    python -m tfcdisc.export --model_dir=RUN --fusion_dir=FUSION --export_dir=EXPORT

Every train and validation product is embedded once (cached under FUSION/features); the
head combines a product's up-to-4 image embeddings (masked attention and mean pooling, and
the image count) instead of averaging its images' log-probabilities (`tfcdisc.fusion`).
Prints the head's validation product accuracy beside the run's own.
"""

from __future__ import annotations

import json
from typing import Sequence

from tfcdisc import cli


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    from tfcdisc import fusion
    f = flags.FLAGS
    try:
        summary = fusion.train(f.model_dir, f.fusion_dir, data_dir=f.data_dir,
                               checkpoint=f.checkpoint, epochs=f.epochs,
                               batch_size=f.batch_size, learning_rate=f.learning_rate,
                               seed=f.seed)
    except (FileNotFoundError, ValueError) as e:
        cli.fail("train_fusion", str(e))
    summary.pop("validation_product_accuracy_by_epoch", None)
    print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("model_dir", None, "A finished train run.", required=True)
    flags.DEFINE_string("fusion_dir", None, "Where the feature cache and the head go.",
                        required=True)
    flags.DEFINE_string("data_dir", None, "The built dataset (default: the run's).")
    flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "The run's checkpoint whose "
                      "embeddings the head learns from (export uses the same).")
    flags.DEFINE_integer("epochs", 10, "Epochs over the cached embeddings.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 256, "Products per step.", lower_bound=1)
    flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.", lower_bound=0.0)
    flags.DEFINE_integer("seed", 0, "Random seed.")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()
