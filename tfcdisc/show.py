"""A picture of sample products with their category names, or with an export's predictions.

    python -m tfcdisc.show --data_dir=DATA --split=train --output=train.png
    python -m tfcdisc.show --saved_model=EXPORT --bson=test.bson --output=predictions.png
    python -m tfcdisc.show --saved_model=EXPORT --data_dir=DATA --split=validation --output=v.png

Each panel is one product: its images in a row, its _id and category path (predicted,
with its probability, and whether it is right where the truth is known).
"""

from __future__ import annotations

from typing import Sequence

from tfcdisc import cli, config


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    from tfcdisc import bsonfile, gallery, inference
    try:
        if f.saved_model:
            stats = inference.PredictStats()
            products, _ = inference.open_products(
                bson=f.bson, data_dir=f.data_dir, split=f.split, stats=stats,
                max_pixels=inference.max_image_pixels(f.saved_model),
                dataset_config=f.dataset_config)
            export, strategy = inference.open_export(f.saved_model, "default")
            samples = gallery.prediction_samples(export, products().as_numpy_iterator(),
                                                 strategy, f.num_products)
        elif f.data_dir:
            samples = gallery.split_samples(f.data_dir, f.split, f.num_products, f.seed,
                                            f.dataset_config)
        else:
            raise ValueError("give --data_dir (a built dataset), or --saved_model with "
                             "--bson or --data_dir")
        gallery.save(gallery.figure(samples, f.columns), f.output)
    except (ValueError, FileNotFoundError, bsonfile.BsonFormatError) as e:
        cli.fail("show", str(e))
    print(f"{f.output}: {len(samples)} products")


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("output", None, "The PNG to write (local or gs://).", required=True)
    flags.DEFINE_string("data_dir", None, "A built TFDS cdiscount dataset.")
    flags.DEFINE_string("split", "train", "The split, with --data_dir.")
    flags.DEFINE_string("dataset_config", None, config.DATASET_CONFIG_HELP)
    flags.DEFINE_string("bson", None, "A Kaggle-style BSON file, with --saved_model.")
    flags.DEFINE_string("saved_model", None, "An export: show its predictions.")
    flags.DEFINE_integer("num_products", 16, "Products in the picture.", lower_bound=1)
    flags.DEFINE_integer("columns", 4, "Products per row.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Which products a split shows (random draw).")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()
