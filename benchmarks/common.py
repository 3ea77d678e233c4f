"""Shared benchmark plumbing: cached catalogues, isolated stages, the results file.

Each measured stage runs in a fresh subprocess, so its peak memory is its own and
stages cannot warm each other's Python caches; stages that are compared run
side by side in the same `make bench` run, because these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "RESULTS.md"
CACHE = pathlib.Path(os.environ.get("TFCDISC_BENCH_CACHE",
                                    os.path.expanduser("~/.cache/tfcdisc-bench")))


def log(*args) -> None:
    print("[bench]", *args, file=sys.stderr, flush=True)


def catalogue(name: str, num_train: int, num_test: int, seed: int = 1) -> pathlib.Path:
    """A synthetic Kaggle folder generated once and cached outside the repo."""
    folder = CACHE / name
    if not (folder / "test_labels.csv").exists():
        from tfcdisc.catalogue import synth
        log(f"generating {folder} ({num_train} train products) once; later runs reuse it")
        synth.generate(str(folder), num_train, num_test, seed=seed, verbose=True,
                       overwrite=True)  # its own cache: what a killed run left is replaced
    return folder


def prefix_copy(src: pathlib.Path, dst: pathlib.Path, max_bytes: int) -> pathlib.Path:
    """The leading whole documents of a BSON file, up to max_bytes (a smaller twin)."""
    if not dst.exists():
        from tfcdisc.catalogue import index as index_lib
        idx = index_lib.load_or_build(str(src))
        ends = idx.offsets + idx.lengths
        cut = int(ends[ends <= max_bytes][-1])
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f, open(str(dst) + ".tmp", "wb") as g:
            g.write(f.read(cut))
        os.replace(str(dst) + ".tmp", dst)
    return dst


def prefix_products(src: pathlib.Path, dst: pathlib.Path, products: int) -> pathlib.Path:
    """The first ``products`` documents of a BSON file (itself a valid BSON file); kept."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as f, open(dst, "wb") as out:
            for _ in range(products):
                head = f.read(4)
                out.write(head + f.read(int.from_bytes(head, "little") - 4))
    return dst


def warm(path: pathlib.Path) -> None:
    """Reads a file once so that every contender sees it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run_stage(module: str, *args: str, timeout: int = 3600, env: dict | None = None) -> dict:
    """Runs ``python -m module --stage ...`` in a fresh process (with ``env`` added to
    the environment); returns its JSON line."""
    cmd = [sys.executable, "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """This process's resident memory now (MB)."""
    return _status_mb("VmRSS")


_BASELINE_MB = [0.0]


def reset_peak() -> None:
    """Starts peak-memory accounting here (after imports), so a stage's peak is its own.

    Linux resets the VmHWM high-water mark when "5" is written to clear_refs.
    """
    _BASELINE_MB[0] = _status_mb("VmRSS") or 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def report(result: dict, *, emit: bool = True, measure: bool = True) -> None:
    """Ends a stage: prints its result and peak memory as one JSON line.

    ``peak_rss_mb`` is the process's peak; ``peak_growth_mb`` how far it rose above
    the resident size at `reset_peak` (after imports), i.e. what the stage itself used.
    """
    if measure:
        peak = _status_mb("VmHWM")
        peak = peak if peak is not None else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_mb"] = round(peak, 1)
        result["peak_growth_mb"] = round(peak - _BASELINE_MB[0], 1)
    if emit:
        print(json.dumps(result), flush=True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def machine() -> str:
    return (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


def write_section(name: str, markdown: str) -> None:
    """Replaces one benchmark's section of RESULTS.md, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by `make bench` (`python -m benchmarks.run`). Every "
        "ratio compares contenders measured side by side in the same run on the same warm "
        "files.\n")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_main(run: Callable[[], None], stages: dict[str, Callable[[argparse.Namespace], None]],
               strings: Sequence[str] = (), ints: Sequence[str] = ()) -> None:
    """A benchmark module's entry: ``--stage=NAME`` runs one measured stage in this process
    (what `run_stage` starts, with its arguments as flags), no stage runs the whole suite."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage")
    for name in strings:
        ap.add_argument(f"--{name}")
    for name in ints:
        ap.add_argument(f"--{name}", type=int)
    a = ap.parse_args()
    if a.stage:
        stages[a.stage](a)
    else:
        run()
