"""Tiny argument checkers that every command runs first, before it loads, trains or writes anything.

Each returns the value (converted where that is lossless) or raises one `FreeVLMError` whose single line names the
command-line flag, the range it must lie in and the value given, e.g. `--limit must be a positive integer, got 0`.
Commands call them on their plain arguments, so the same checks guard the Python API (`freevlm.commands.*`) and the
CLI; argparse only parses types. New arguments get one line each, e.g. `positive_int("draft_length", draft_length)`.

Why not argparse `type=` callables: the commands are plain Python functions that work without the CLI, and some
checks depend on other arguments (a threshold's range depends on the criterion).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from freevlm.errors import FreeVLMError


def flag(name: str) -> str:
    """The command-line spelling of a parameter: `max_new_tokens` -> `--max-new-tokens`."""
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None, *, what: str = "an integer") -> int:
    """An int >= `minimum`. Floats are refused, not truncated, even when whole: `2.5` must never become 2."""
    if not _is_int(value):
        raise FreeVLMError(f"{flag(name)} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise FreeVLMError(f"{flag(name)} must be {what}, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    return integer(name, value, 1, what="a positive integer")


def non_negative_int(name: str, value: Any) -> int:
    return integer(name, value, 0, what="an integer >= 0")


def whole_number(name: str, value: Any, minimum: int | None = None) -> int:
    """An int given as an int or as a float with no fractional part (a criterion setting arrives as a float)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    what = "a whole number" + (f" >= {minimum}" if minimum is not None else "")
    return integer(name, value, minimum, what=what)


def _bounds(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> float:
    """A finite float inside the given bounds (open or closed at each end). NaN and infinities are refused: they
    compare False with everything, so a range check alone lets them through."""
    where = _bounds(low, high, low_open, high_open)
    what = f"a finite number{' ' + where if where else ''}"
    if _is_int(value):
        value = float(value)
    if not isinstance(value, float) or not math.isfinite(value):
        raise FreeVLMError(f"{flag(name)} must be {what}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise FreeVLMError(f"{flag(name)} must be {what}, got {value!r}")
    return value


def positive_number(name: str, value: Any) -> float:
    return number(name, value, 0.0, low_open=True)


def fraction(name: str, value: Any) -> float:
    """A share strictly between 0 and 1 (both parts of a split must be non-empty)."""
    return number(name, value, 0.0, 1.0, low_open=True, high_open=True)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    options = list(choices)
    if value not in options:
        raise FreeVLMError(f"{flag(name)} must be one of {', '.join(options)}, got {value!r}")
    return value


def choices(name: str, values: Sequence[Any], options: Iterable[str]) -> list[str]:
    """Every value of a list argument among `options` (and the list not empty)."""
    options = list(options)
    if not values:
        raise FreeVLMError(f"{flag(name)} needs at least one of {', '.join(options)}")
    for v in values:
        choice(name, v, options)
    return list(values)


def optional(check, name: str, value: Any, *args, **kwargs):
    """`check(name, value, ...)` unless `value` is None (an argument whose default means "the recipe's")."""
    return None if value is None else check(name, value, *args, **kwargs)


# --- groups of arguments that several commands share ------------------------------------------------------------


def threshold(criterion: str, value: Any, name: str = "threshold") -> float:
    """A criterion's one setting: finite, a whole number for patience, and in the criterion's own range (which the
    criterion class states; constructing it here checks it before any model is loaded)."""
    from freevlm.generation.criteria import make_criterion

    value = number(name, value)
    if criterion == "patience":
        value = float(whole_number(name, value, 1))
    make_criterion(criterion, value)
    return value


def decoding(criterion: str, thresholds: Sequence[float], kv_policy: str, num_beams: int = 1,
             max_new_tokens: int = 1, threshold_name: str = "threshold") -> None:
    """The decoding arguments of generate / evaluate / sweep (`threshold_name`: the flag the settings came in)."""
    from freevlm.generation.criteria import CRITERIA
    from freevlm.generation.kv import POLICIES

    choice("criterion", criterion, CRITERIA)
    for t in thresholds:
        threshold(criterion, t, threshold_name)
    choice("kv_policy", kv_policy, POLICIES)
    positive_int("num_beams", num_beams)
    positive_int("max_new_tokens", max_new_tokens)


def drafting(mode: str, draft_layer: Any, draft_length: Any, draft_threshold: Any) -> None:
    """The decoding mode and speculative decoding's draft settings (checked whatever the mode, since a bad value
    given with the wrong mode is still a mistake worth a line)."""
    from freevlm.generation.api import MODES

    choice("mode", mode, MODES)
    optional(positive_int, "draft_layer", draft_layer)
    positive_int("draft_length", draft_length)
    optional(number, "draft_threshold", draft_threshold, 0.0, 1.0)


def dataset_name(name: str) -> str:
    from freevlm.data.datasets import DATASETS

    return choice("dataset", name, DATASETS)
