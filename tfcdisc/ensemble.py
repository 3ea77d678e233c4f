"""Combines exports into one: a self-contained SavedModel averaging their probabilities.

    python -m tfcdisc.ensemble --saved_model=A --saved_model=B [--saved_model=...] \
        [--weights=1,1,...] [--duplicates_from=DATA] --export_dir=ENSEMBLE

Members may differ in backbone, image size, test-time augmentation (`--tta` of
`tfcdisc.export`) and fusion heads (`--fusion_dir`: the members' learned image weights are
averaged); they must share the taxonomy. The result has the same signatures as
any export, so `tfcdisc.predict` and `tfcdisc.evaluate` take it as it is.
"""

from __future__ import annotations

import json

from tfcdisc import cli
from tfcdisc import settings


def main(f: settings.EnsembleSettings) -> None:
    from tfcdisc.serve import exporting
    weights = [float(w) for w in f.weights] if f.weights else None
    summary = exporting.ensemble(f.saved_model, f.export_dir, weights, f.duplicates_from,
                                 f.lock_lease_minutes)
    print(json.dumps(summary, indent=2))


run = cli.command("ensemble", settings.EnsembleSettings, main, __doc__, backend="tensorflow",
                  after_stop="{export_dir} was left as it was (an export replaces it only "
                  "when whole): rerun the same command")


if __name__ == "__main__":
    run()
