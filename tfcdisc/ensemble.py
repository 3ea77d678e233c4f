"""Combines exports into one: a self-contained SavedModel averaging their probabilities.

    python -m tfcdisc.ensemble --saved_model=A --saved_model=B [--saved_model=...] \
        [--weights=1,1,...] [--duplicates_from=DATA] --export_dir=ENSEMBLE

Members may differ in backbone, image size and test-time augmentation (`--tta` of
`tfcdisc.export`); they must share the taxonomy. The result has the same signatures as
any export, so `tfcdisc.predict` and `tfcdisc.evaluate` take it as it is.
"""

from __future__ import annotations

import json
from typing import Sequence

from tfcdisc import cli


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    from tfcdisc import serving
    f = flags.FLAGS
    try:
        weights = [float(w) for w in f.weights] if f.weights else None
        summary = serving.ensemble(f.saved_model, f.export_dir, weights, f.duplicates_from)
    except (FileNotFoundError, ValueError) as e:
        cli.fail("ensemble", str(e))
    print(json.dumps(summary, indent=2))


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_multi_string("saved_model", None, "A member export (repeat the flag).",
                              required=True)
    flags.DEFINE_list("weights", None, "One weight per --saved_model, in order (default: "
                      "equal).")
    flags.DEFINE_string("export_dir", None, "Where to write the ensemble (local or gs://).",
                        required=True)
    flags.DEFINE_string("duplicates_from", None, "A built dataset: give the ensemble a "
                        "duplicate-image table, weighed on its validation split (as "
                        "`tfcdisc.export --duplicates_from`).")


def run() -> None:
    cli.run(_define_flags, main, __doc__, backend="tensorflow")


if __name__ == "__main__":
    run()
