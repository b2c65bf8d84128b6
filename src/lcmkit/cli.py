"""The ``lcmkit`` command line: a thin shell over the library.

Each subcommand lives in ``lcmkit.commands.<name>`` with two functions: ``register(subparsers)`` (argparse
only, cheap to import) and ``run(args) -> int`` (imports torch and does the work through the library API).
Packages that extend lcmkit (its proving ground, ``lcmkit_world``) add theirs through the ``lcmkit.commands``
entry points: a ``register(subparsers)`` each, listed after lcmkit's own commands.
Every :class:`~lcmkit.errors.LcmkitError` becomes one line on stderr and exit code 2: no tracebacks for
bad input. Ctrl-C, wherever it lands (start-up imports included), is one line and exit code 130. stderr carries
lcmkit's own progress bars only: the dependencies' loading and saving bars are turned off.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .errors import LcmkitError
from .single_file import using_config

#: Subcommand modules under lcmkit.commands, in the order ``lcmkit --help`` lists them.
COMMANDS = ["generate", "distill", "finetune", "refine", "lora", "convert"]
#: Entry-point group of extensions' subcommands (a ``register(subparsers)`` each).
COMMAND_ENTRY_POINTS = "lcmkit.commands"


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``lcmkit CMD: error: ...; see --help``) and exit code 2, like every
    other bad input (argparse's default prints the multi-line usage first). Subparsers inherit the class.

    No abbreviated flags: with them, ``lcmkit finetune --mode full`` (a flag finetune does not have) silently
    became ``--model full``; an unknown flag must be an error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: errno → what a failed write means for the user (disk full, read-only, no permission)
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def os_error_message(e: OSError) -> str | None:
    """One line for an OSError the user can act on (disk full, unwritable path), or None for anything else."""
    if e.errno not in WRITE_ERRORS:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{WRITE_ERRORS[e.errno]}{where}; free space or fix permissions, then run again (training runs: "
            "with --resume, which continues from the last complete checkpoint)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lcmkit", description="Latent Consistency Models and LCM-LoRA: few-step Stable Diffusion."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lcmkit.commands.{name}").register(sub)
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda ep: ep.name):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken extension must not take lcmkit's own commands down with it
            print(f"lcmkit: warning: the {ep.name!r} commands ({ep.value}) could not be loaded: "
                  f"{type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C during start-up (imports, parsing) or anywhere _main does not catch it
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not str(a).startswith("-")), None)
        print(f"lcmkit {command}: interrupted" if command else "lcmkit: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    if not os.environ.get("LCMKIT_DEBUG"):
        # library warnings (torchvision fallbacks, dtype notes) would turn a one-line error into several lines
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # transformers' and huggingface_hub's bars ("Writing model shards", "Loading weights", "Fetching N files")
    # read this when they are imported; diffusers' are turned off around loading (pipelines._quiet_loading)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with using_config(getattr(args, "model_config", None)):  # --model-config: a single-file model's configs
            return int(args.run(args) or 0)
    except LcmkitError as e:
        print(f"lcmkit {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # disk full, read-only or unwritable output: say so in words; others are unexpected
        message = os_error_message(e)
        if message is None or os.environ.get("LCMKIT_DEBUG"):
            return _internal_error(args.command, e)
        print(f"lcmkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lcmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: one line by default, the traceback with LCMKIT_DEBUG=1
        return _internal_error(args.command, e)


def _internal_error(command: str, e: Exception) -> int:
    if os.environ.get("LCMKIT_DEBUG"):
        raise e
    text = " ".join(str(e).split())  # one line, whatever the exception's message holds
    print(f"lcmkit {command}: internal error: {type(e).__name__}: {text} (set LCMKIT_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
