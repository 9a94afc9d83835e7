"""The `freevlm` command line: a table of plain functions (`commands/`, one module per command), each callable from
Python too.

Arguments come from each function's signature: a parameter `exit_layers: list[int] | None = None` becomes
`--exit-layers 3 6 9`, a `bool` parameter becomes `--flag/--no-flag`, a parameter without a default is required.
Help text comes from the function's docstring ("name: text" lines). Bad input ends with `error: <one line>`, exit 2:
argparse's own errors (an unparsable value, a missing argument) too, without its usage block (`--help` shows it).
The commands check their arguments first (`freevlm.validate`), so a bad value fails before any work starts.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import types
import typing
from pathlib import Path

from freevlm.commands import demo, evaluate, generate, make_data, plan, pretrain, reproduce, serve, sweep, train
from freevlm.errors import FreeVLMError

COMMANDS = {
    "demo": demo.demo,
    "make-data": make_data.make_data,
    "pretrain": pretrain.pretrain,
    "train-backbone": train.train_backbone,
    "train-exits": train.train_exits,
    "generate": generate.generate,
    "evaluate": evaluate.evaluate,
    "sweep": sweep.sweep,
    "plan": plan.plan,
    "reproduce": reproduce.reproduce,
    "serve": serve.serve,
}


def _param_help(fn) -> dict[str, str]:
    out = {}
    for line in (inspect.getdoc(fn) or "").splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep and name.isidentifier():
            out[name] = text
    return out


def _unwrap(annotation):
    """(base type, is_list) of an annotation like `int`, `list[float] | None`, `Path`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, fn) -> None:
    helps = _param_help(fn)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        flag = "--" + name.replace("_", "-")
        base, is_list = _unwrap(hints.get(name, str))
        kwargs = {"help": helps.get(name, "").replace("%", "%%")}  # argparse formats help with %
        required = param.default is inspect.Parameter.empty
        if base is bool and not is_list:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=param.default,
                                help=kwargs["help"])
            continue
        kwargs["type"] = {int: int, float: float, Path: Path}.get(base, str)
        if is_list:
            kwargs["nargs"] = "+"
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
            if param.default not in (None, [], ()):
                kwargs["help"] += f" (default: {param.default})"
        parser.add_argument(flag, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (subcommand parsers inherit the class)."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="freevlm", description="Early-exit decoding for BLIP-2-style VLMs (FREE).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, fn in COMMANDS.items():
        doc = inspect.getdoc(fn) or ""
        summary = doc.splitlines()[0] if doc else ""
        p = sub.add_parser(name, help=summary, description=doc.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = vars(build_parser().parse_args(argv))
    fn = COMMANDS[args.pop("command")]
    try:
        fn(**{k: v for k, v in args.items()})
    except FreeVLMError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment, not the input: a full disk, a folder that became unwritable
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {one_line(err.strerror or err)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
