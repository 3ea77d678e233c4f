"""A picture of sample products with their category names, or with an export's predictions.

    python -m tfcdisc.show --data_dir=DATA --split=train --output=train.png
    python -m tfcdisc.show --saved_model=EXPORT --bson=test.bson --output=predictions.png
    python -m tfcdisc.show --saved_model=EXPORT --data_dir=DATA --split=validation --output=v.png
    python -m tfcdisc.show --saved_model=EXPORT --bson=test.bson --labels=test_labels.csv \
        --worst --output=mistakes.png

Each panel is one product: its images in a row, its _id and category path; with an
export, its top 3 categories and their probabilities, in green when right, red when
wrong (the truth then named) where the truth is known; ``--worst``: the most confident
mistakes.
"""

from __future__ import annotations


from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.ShowSettings) -> None:
    from tfcdisc.serve import gallery, inference
    if f.labels and not f.bson:
        raise ValueError("--labels marks the products of --bson; a --data_dir split has "
                         "its own categories")
    if (f.worst or f.labels) and not f.saved_model:
        raise ValueError("--worst and --labels judge an export's predictions: give "
                         "--saved_model")
    if f.saved_model:
        if not (f.bson or f.data_dir):
            raise ValueError("--saved_model shows the predictions of --bson or --data_dir: "
                             "give one")
        from tfcdisc.catalogue import labels as labels_lib
        scoring = inference.open_scoring(
            f.saved_model, strategy="default", bson=f.bson, data_dir=f.data_dir,
            split=f.split, dataset_config=f.dataset_config,
            label_map=labels_lib.read(f.labels) if f.labels else None)
        samples = gallery.prediction_samples(scoring, f.num_products,
                                             scan=f.scan if f.worst else None)
        if f.worst and not samples:  # still a picture: the first products, all right
            print(f"show: no mistake among the first {f.scan} products with known "
                  "categories; drawing the first ones instead")
            samples = gallery.prediction_samples(scoring, f.num_products)
    elif f.data_dir:
        samples = gallery.split_samples(f.data_dir, f.split, f.num_products, f.seed,
                                        f.dataset_config)
    else:
        raise ValueError("give --data_dir (a built dataset), or --saved_model with "
                         "--bson or --data_dir")
    gallery.save(gallery.figure(samples, f.columns), f.output)
    print(f"{f.output}: {len(samples)} products")


run = cli.command("show", settings.ShowSettings, main, __doc__, backend="flag")


if __name__ == "__main__":
    run()
