"""Method options from the command line: ``--set METHOD.FIELD=VALUE``, the Attend-and-Excite shortcut flags and
``--attn-res``, each checked against its method's field and remembered with the flag it came from."""

from __future__ import annotations

from ..controls.options import option_value, parse_methods, parse_option
from ..errors import OptionError
from .parser import AE_SHORTCUTS


def method_names(text: str | None, flag: str = "--methods") -> list[str]:
    """``"attend-excite,refocus"`` (or ``+``) -> names, each known and given once; ``"none"`` -> []."""
    from ..controls import METHODS

    return parse_methods(text, METHODS, flag)


def options_from_args(args, names: list[str]) -> tuple[dict, dict]:
    """(options per method, source flag per (method, field)) from ``--set``, the A&E shortcuts and ``--attn-res``."""
    from ..controls import METHODS

    options: dict[str, dict] = {}
    sources: dict[tuple[str, str], str] = {}

    def put(method: str, field: str, value, flag: str, text: bool) -> None:
        name, checked = option_value(METHODS, method, field, value, flag, text)
        if method not in names:
            raise OptionError(f"{flag}: {method} is not among the methods {', '.join(names) or 'none'}")
        if (method, name) in sources:  # a shortcut and --set, an alias and its field, or the same --set twice
            already = sources[(method, name)]
            raise OptionError(f"{flag} sets {method}.{name}, which {already} already sets; give it once")
        options.setdefault(method, {})[name] = checked
        sources[(method, name)] = flag

    for item in args.set:
        method, field, value = parse_option(item)
        put(method, field, value, f"--set {item}", True)
    for arg, field in AE_SHORTCUTS.items():
        value = getattr(args, arg)
        if value is None:
            continue
        flag = "--" + arg.replace("_", "-")
        if "attend-excite" not in names:
            others = [m for m in names if field in {f for f in METHODS[m].__dataclass_fields__}]
            hint = f"; for {others[0]} use --set {others[0]}.{field}=..." if others else ""
            raise OptionError(
                f"{flag} is an attend-excite option, and attend-excite is not among the methods "
                f"{', '.join(names) or 'none'}{hint}"
            )
        put("attend-excite", field, value, flag, False)
    if args.no_refinement:
        if "attend-excite" not in names:
            raise OptionError(f"--no-refinement is an attend-excite option; the methods are {', '.join(names)}")
        put("attend-excite", "thresholds", {}, "--no-refinement", False)
    if args.attn_res:
        if len(args.attn_res) not in (1, 2):
            raise OptionError(f"--attn-res takes N or ROWS COLS, got {args.attn_res}")
        res = tuple(args.attn_res) if len(args.attn_res) == 2 else args.attn_res[0]
        for method in names:
            put(method, "attn_res", res, "--attn-res", False)
    return options, sources
