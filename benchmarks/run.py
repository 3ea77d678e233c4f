"""Runs the benchmarks and rewrites their sections of benchmarks/RESULTS.md.

    python -m benchmarks.run            # all
    python -m benchmarks.run bson tfds  # some
    python -m benchmarks.run scale      # the real counts (`make bench-scale`): not in "all"
"""

import importlib
import sys

SUITES = ["bson", "tfds", "train", "backends", "predict", "gains", "preflight"]
LONG = ["scale"]  # 12 GB of disk, the real counts: run by name only


def main() -> None:
    names = sys.argv[1:] or SUITES
    unknown = set(names) - set(SUITES) - set(LONG)
    if unknown:
        sys.exit(f"unknown benchmark(s) {sorted(unknown)}; choose from {SUITES + LONG}")
    for name in names:
        importlib.import_module(f"benchmarks.bench_{name}").run()


if __name__ == "__main__":
    main()
