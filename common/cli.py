"""The one command-line reader of every entry point (prep, train, infer, demo, bench).

The whole argv is checked against the command's signature before the command
runs: an unknown option, an extra argument, a value of the wrong type, or an
option given twice is one `error:` line and exit 2 (common.errors.run_cli),
with nothing done.  fire, which this replaces as the dispatcher, applied
unknown flags only after the call returned, so a mistyped option ran the whole
job first.

Types come from a parameter's annotation, else from its default (bool, int,
float, str); a parameter without a default takes the text as given (a path); one
defaulting to None takes fire's literal reading ('0,1' -> (0, 1)), which the
command's own parser (common.arglists) then checks.  A `**kwargs` parameter
takes any other `--key=value` (train's dotted config keys), each at most once.
"""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from typing import Callable, Mapping

from fire.parser import DefaultParseValue

from common.errors import BadInput, run_cli

HELP = ("-h", "--help")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text",
               type(None): "None"}


def run_commands(prog: str, commands: Mapping[str, Callable], argv=None, doc: str = ""):
    """`prog COMMAND [args]`: the command's argv checked whole, then the command called."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _dispatch(prog, commands, [str(a) for a in argv], doc))


def run_command(prog: str, fn: Callable, argv=None):
    """`prog [args]` for a module with one command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _call(prog, fn, [str(a) for a in argv]))


def _dispatch(prog, commands, argv, doc):
    if not argv or argv[0] in HELP:
        if not argv:
            raise BadInput(f"no command given; one of {', '.join(commands)} "
                           f"(python -m {prog} --help)")
        print(commands_help(prog, commands, doc))
        return None
    name, rest = argv[0], argv[1:]
    if name not in commands:
        raise BadInput(f"unknown command {name!r}; commands: {', '.join(commands)} "
                       f"(python -m {prog} --help)")
    return _call(f"{prog} {name}", commands[name], rest)


def _call(prog, fn, argv):
    if any(a in HELP for a in argv):
        print(command_help(prog, fn))
        return None
    kwargs = parse_args(prog, fn, argv)
    result = fn(**kwargs)
    _print_result(result)
    return result


def parse_args(prog: str, fn: Callable, argv: list[str]) -> dict:
    """argv -> keyword arguments of `fn`, or BadInput naming the first fault."""
    sig = inspect.signature(fn, eval_str=True)
    params = {p.name: p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    usage = f"python -m {prog} --help"
    out: dict = {}
    spelled: dict = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if not _is_flag(a):
            positional.append(a)
            continue
        key, eq, raw = a.lstrip("-").partition("=")
        name = key.replace("-", "_")
        p = params.get(name)
        if p is None and name.startswith("no") and _is_bool(params.get(name[2:])) and not eq:
            p, raw, eq = params[name[2:]], "false", "="   # fire's --noflag
            name = p.name
        if p is None and not var_kw:
            raise BadInput(f"unknown option --{key}; {prog} takes "
                           f"{_option_list(params)} ({usage})")
        if name in out:
            raise BadInput(f"--{key} given twice ({spelled[name]} and {_spelling(a, argv, i)}); "
                           "give it once")
        spelled[name] = _spelling(a, argv, i)
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if _is_bool(p) or (p is None and (nxt is None or _is_flag(nxt))):
                if nxt is not None and nxt.lower() in _TRUE + _FALSE and _is_bool(p):
                    raw, i = nxt, i + 1
                else:
                    raw = "true"
            elif nxt is None or _is_flag(nxt):
                raise BadInput(f"--{key} needs a value ({usage})")
            else:
                raw, i = nxt, i + 1
        out[name] = _convert(p, raw, f"--{key}") if p is not None else DefaultParseValue(raw)
    required = [n for n, p in params.items() if p.default is p.empty and n not in out]
    if len(positional) > len(required):
        extra = positional[len(required):]
        raise BadInput(f"unexpected argument {extra[0]!r}: {prog} takes "
                       f"{len(required) or 'no'} more positional argument(s)"
                       f"{' (' + ', '.join(n.upper() for n in required) + ')' if required else ''}"
                       f"; options are given as --name value ({usage})")
    for name, raw in zip(required, positional):
        out[name] = _convert(params[name], raw, name.upper())
    missing = [n for n in required if n not in out]
    if missing:
        raise BadInput(f"missing {missing[0].upper()}: give it as an argument or "
                       f"--{missing[0].replace('_', '-')} ({usage})")
    return out


def _spelling(a: str, argv: list[str], i: int) -> str:
    """The option as typed, with its value when that is the next word."""
    if "=" in a or i >= len(argv) or _is_flag(argv[i]):
        return a
    return f"{a} {argv[i]}"


def _is_flag(a: str) -> bool:
    return a.startswith("--") and len(a) > 2 or (len(a) > 1 and a[0] == "-" and a[1].isalpha())


def _allowed(p) -> tuple | None:
    """The types a parameter takes; None: anything fire's literal reading gives."""
    ann = p.annotation
    if ann is not p.empty:
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            return typing.get_args(ann)
        return (ann,)
    if p.default is p.empty:
        return (str,)
    if p.default is None:
        return None
    return (type(p.default),)


def _is_bool(p) -> bool:
    return p is not None and _allowed(p) is not None and bool in _allowed(p)


def _convert(p, raw: str, option: str):
    allowed = _allowed(p)
    if allowed is None:
        return DefaultParseValue(raw)
    text = raw.strip()
    if type(None) in allowed and text in ("None", "none", "null"):
        return None
    if bool in allowed and text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    if int in allowed:
        try:
            return int(text)
        except ValueError:
            pass
    if float in allowed:
        try:
            return float(text)
        except ValueError:
            pass
    if str in allowed:
        return raw
    want = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed)
    raise BadInput(f"{option} {raw!r}: expected {want}")


def _option_list(params) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in params) or "no options"


def commands_help(prog: str, commands: Mapping[str, Callable], doc: str = "") -> str:
    width = max(len(n) for n in commands) + 2
    lines = [f"usage: python -m {prog} COMMAND [ARGUMENTS] [--option VALUE ...]", ""]
    if doc.strip():
        lines += [inspect.cleandoc(doc), ""]
    lines.append("commands:")
    for name, fn in commands.items():
        first = (inspect.getdoc(fn) or "").split("\n")[0]
        lines.append(f"  {name:<{width}}{first}")
    lines += ["", f"python -m {prog} COMMAND --help shows a command's arguments and options."]
    return "\n".join(lines)


def command_help(prog: str, fn: Callable) -> str:
    sig = inspect.signature(fn, eval_str=True)
    required, options = [], []
    for p in sig.parameters.values():
        flag = "--" + p.name.replace("_", "-")
        if p.kind == p.VAR_KEYWORD:
            options.append(("--section.key=value", "any config key (YAML types)"))
        elif p.default is p.empty:
            required.append(p.name.upper())
            options.append((f"{p.name.upper()} | {flag}", "required"))
        else:
            kind = "flag" if _is_bool(p) else f"default: {p.default!r}"
            options.append((flag, kind))
    width = max((len(o) for o, _ in options), default=0) + 2
    lines = [f"usage: python -m {prog} {' '.join(required)} [--option VALUE ...]".replace("  ", " "),
             "", inspect.getdoc(fn) or "", "", "arguments and options:"]
    lines += [f"  {o:<{width}}{d}" for o, d in options]
    return "\n".join(lines)


def _print_result(result) -> None:
    """What the command returned, as fire printed it: a dict one `key: value` a line."""
    if result is None:
        return
    if isinstance(result, dict):
        width = max((len(str(k)) for k in result), default=0) + 1
        for k, v in result.items():
            print(f"{str(k) + ':':<{width}} {_one_line(v)}")
    elif isinstance(result, (list, set, frozenset)):
        for v in result:
            print(_one_line(v))
    else:
        print(result)


def _one_line(v) -> str:
    if isinstance(v, str):
        return v.replace("\n", " ")
    try:
        return json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(v).replace("\n", " ")
