"""Trains a fusion head: how much each of a product's images counts, learned on products
the run did not train on (its dataset's validation split), with the run's image model
frozen.

    python -m tfcdisc.train_fusion --model_dir=RUN --fusion_dir=FUSION [--data_dir=DATA] \
        [--epochs=10] [--batch_size=256] [--learning_rate=0.001]
    python -m tfcdisc.export --model_dir=RUN --fusion_dir=FUSION --export_dir=EXPORT

The validation products are embedded once (cached under FUSION/features); the head
scores each image from its embedding and confidence, and a product's answer weighs its
images' log-probabilities by those scores instead of equally (`tfcdisc.learn.fusion`).
Three validation products in four teach it, the fourth chooses its epoch; prints its
accuracy there beside the run's own. The export takes it as part of the image model,
so it combines with flip TTA, ensembles and the duplicate table.
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
    summary.pop("check_product_accuracy_by_epoch", None)
    print(json.dumps(summary, indent=2))


run = cli.command("train_fusion", settings.FusionSettings, main, __doc__, backend="flag",
                  after_stop="{fusion_dir} keeps what was complete (the embeddings once "
                  "all were cached): rerun the same command")


if __name__ == "__main__":
    run()
