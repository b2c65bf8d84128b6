"""The ``lcmkit`` command line: a thin shell over the library.

Each subcommand lives in ``lcmkit.commands.<name>`` with two functions: ``register(subparsers)`` (argparse
only, cheap to import) and ``run(args) -> int`` (imports torch and does the work through the library API).
Every :class:`~lcmkit.errors.LcmkitError` becomes one line on stderr and exit code 2: no tracebacks for
bad input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LcmkitError

#: Subcommand modules under lcmkit.commands, in the order ``lcmkit --help`` lists them.
COMMANDS = ["generate", "world", "eval", "distill", "finetune", "lora", "bench", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcmkit", description="Latent Consistency Models and LCM-LoRA: few-step Stable Diffusion."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lcmkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lcmkit.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LcmkitError as e:
        print(f"lcmkit {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lcmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: one line by default, the traceback with LCMKIT_DEBUG=1
        if os.environ.get("LCMKIT_DEBUG"):
            raise
        print(f"lcmkit {args.command}: internal error: {type(e).__name__}: {e} (set LCMKIT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
