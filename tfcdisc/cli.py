"""Runs an entry point's absl main, with its flags shown by ``--help``.

absl's ``--help`` lists the flags of the program's main module; for a console script
(``tfcdisc-train``) that is the generated wrapper, so the command's own flags are
registered under it too.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def run(define_flags: Callable[[], None], main: Callable[[Sequence[str]], None]) -> None:
    from absl import app, flags
    define_flags()
    program = sys.argv[0]
    for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
        flags.FLAGS.register_flag_by_module(program, flag)
    app.run(main)
