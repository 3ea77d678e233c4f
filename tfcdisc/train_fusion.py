"""Trains a product-level fusion head on a finished run's frozen image model.

    python -m tfcdisc.train_fusion --model_dir=RUN --fusion_dir=FUSION [--data_dir=DATA] \
        [--epochs=10] [--batch_size=256] [--learning_rate=0.001]
    python -m tfcdisc.export --model_dir=RUN --fusion_dir=FUSION --export_dir=EXPORT

Every train and validation product is embedded once (cached under FUSION/features); the
head combines a product's up-to-4 image embeddings (masked attention and mean pooling, and
the image count) instead of averaging its images' log-probabilities (`tfcdisc.learn.fusion`).
Prints the head's validation product accuracy beside the run's own.
"""

from __future__ import annotations

import json

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.FusionSettings) -> None:
    from tfcdisc.learn import fusion
    summary = fusion.train(f.model_dir, f.fusion_dir, data_dir=f.data_dir,
                           checkpoint=f.checkpoint, epochs=f.epochs, batch_size=f.batch_size,
                           learning_rate=f.learning_rate, seed=f.seed,
                           lock_lease_minutes=f.lock_lease_minutes)
    summary.pop("validation_product_accuracy_by_epoch", None)
    print(json.dumps(summary, indent=2))


run = cli.command("train_fusion", settings.FusionSettings, main, __doc__, backend="flag",
                  after_stop="{fusion_dir} keeps what was complete (the embeddings once "
                  "all were cached): rerun the same command")


if __name__ == "__main__":
    run()
