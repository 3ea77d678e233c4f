"""The ground floor: every command's settings and the flags they are.

`fields` makes a dataclass field a flag (help, choices, bounds, paths) and maps dataclasses
to absl flags and back; `commands` holds one dataclass per command. Every wing and
command reads its settings from here, and this package imports no other part of tfcdisc
and no TensorFlow, so ``--help`` answers at once.
"""

from tfcdisc.settings.commands import *  # noqa: F401,F403
from tfcdisc.settings.commands import __all__ as _commands
from tfcdisc.settings.fields import *  # noqa: F401,F403
from tfcdisc.settings.fields import __all__ as _fields

__all__ = [*_fields, *_commands]
