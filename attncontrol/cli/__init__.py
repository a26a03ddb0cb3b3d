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

    handlers = {"generate": commands.cmd_generate, "tokens": commands.cmd_tokens, "methods": commands.cmd_methods,
                "batch": runs.cmd_batch, "eval": runs.cmd_eval, "export": runs.cmd_export,
                "ui": runs.cmd_ui}  # fmt: skip
    try:
        return handlers[args.command](args)
    except AttnControlError as err:
        first, *rest = str(err).splitlines() or [type(err).__name__]
        hint = " (`attncontrol tokens PROMPT --model ...` shows the token table)"
        hint = hint if isinstance(err, SubjectError) else ""
        print(f"error: {first}{hint if rest else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.command} stopped{runs.progress_note()}", file=sys.stderr)
        return 130
