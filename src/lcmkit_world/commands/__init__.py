"""The proving ground's subcommands, registered into ``lcmkit`` through the ``lcmkit.commands`` entry point.

Each module has ``register(subparsers)`` (argparse only, cheap to import) and a ``run(args)`` set as the parser's
default, as lcmkit's own commands do.
"""

from __future__ import annotations

import importlib

#: listed by ``lcmkit --help`` after lcmkit's own commands, in this order
COMMANDS = ["world", "eval", "bench", "demo"]


def register(sub) -> None:
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
