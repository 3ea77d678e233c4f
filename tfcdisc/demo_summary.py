"""Prints where `make demo` put everything and how well it did."""

from __future__ import annotations

import json
import os
import sys


def summary(demo_dir: str) -> str:
    def load(name):
        with open(os.path.join(demo_dir, name)) as f:
            return json.load(f)

    test, val = load("report_test.json"), load("report_validation.json")
    with open(os.path.join(demo_dir, "submission.csv")) as f:
        rows = sum(1 for _ in f) - 1
    d = os.path.abspath(demo_dir)
    return f"""
== demo finished
   product accuracy on the scored test set: {test['product_accuracy']:.4f} ({test['products']} products)
   product accuracy on the validation split: {val['product_accuracy']:.4f} ({val['products']} products)
   submission:  {d}/submission.csv ({rows} rows)
   SavedModel:  {d}/export   (saved_model_cli show --dir {d}/export --all)
   reports:     {d}/report_test.json, {d}/report_validation.json
   pictures:    {d}/report_test.png (accuracy by category and images per product),
                {d}/mistakes.png (the test products it got wrong, the most confident first)
   training:    {d}/run (history.csv, checkpoints/)
   TensorBoard: .venv/bin/tensorboard --logdir {d}/run/logs
{NEXT_STEPS}"""


# What `make demo` ends with, and the README's "Your data in six commands" (a test keeps
# them the same): KAGGLE holds train.bson, test.bson and category_names.csv.
NEXT_STEPS = """
== your own data in six commands (README: "Your data in six commands")
   source .venv/bin/activate
   python -m tfcdisc.inspect --bson=KAGGLE/train.bson
   python -m tfcdisc.build --manual_dir=KAGGLE --data_dir=DATA
   python -m tfcdisc.train --flagfile=efficientnetv2_b0_gpu --data_dir=DATA --model_dir=RUN
   python -m tfcdisc.export --model_dir=RUN --export_dir=EXPORT
   python -m tfcdisc.predict --saved_model=EXPORT --bson=KAGGLE/test.bson --output=submission.csv
"""


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo_dir", default="demo")
    print(summary(parser.parse_args().demo_dir))


if __name__ == "__main__":
    sys.exit(main())
