"""Command line: ``attncontrol generate | batch | eval | ui | tokens | methods``.

Every expected error ends in one ``error: ...`` line and exit status 2; Ctrl-C in exit status 130 with what
was done. Nothing heavy is imported before a command needs it (``--help`` and ``methods`` need no torch)."""

from __future__ import annotations

import sys

from ..errors import AttnControlError, SubjectError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands, runs

    handlers = {
        "generate": commands.cmd_generate,
        "tokens": commands.cmd_tokens,
        "methods": commands.cmd_methods,
        "batch": runs.cmd_batch,
        "eval": runs.cmd_eval,
        "export": runs.cmd_export,
        "ui": runs.cmd_ui,
    }
    try:
        return handlers[args.command](args)
    except AttnControlError as err:
        first, *rest = str(err).splitlines() or [type(err).__name__]
        hint = " (`attncontrol tokens PROMPT --model ...` shows the token table)"
        hint = hint if isinstance(err, SubjectError) else ""
        print(f"error: {first}{hint if rest else ''}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader closed the pipe (`attncontrol methods | head -1`): not a failure; no traceback at exit either
        _silence_stdout()
        return 0
    except OSError as err:  # a full disk, a read-only folder, ...: one line naming the file
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"error: {args.command} ran out of memory (smaller --height/--width, fewer images or seeds?)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.command} stopped{runs.progress_note()}", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
