"""Value parsers shared by ShrinkOptions, recipes, check configs and the CLI. Each raises an IsocompressError that
names `key` at `where` (a file, "ShrinkOptions", or the command line, where it names the flag)."""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

from isocompress.core.errors import IsocompressError

FORMATS = ("safetensors", "onnx")


COMMAND_LINE = "command line"  # the `where` of values given as flags: errors then name the flag, --max-bytes
FLAGS_ONLY = "command-line"  # the name of the recipe `shrink` builds from its flags when no --recipe is given


def fail(where: str, key: str | None, problem: str) -> IsocompressError:
    """`where: 'key' problem` (a file's key); `--key problem` for flags; `where problem` when key is None."""
    if key is None:
        return IsocompressError(f"{where} {problem}")
    if where == COMMAND_LINE:
        return IsocompressError(f"--{key} {problem}")
    return IsocompressError(f"{where}: {key!r} {problem}")


def check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    """Unknown keys are errors that name the key and suggest the closest allowed one (max_error → max-error)."""
    for key in data:
        if key in allowed:
            continue
        text = str(key)
        close = difflib.get_close_matches(text.replace("_", "-").lower(), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise IsocompressError(f"{where}: unknown key {text[:60]!r}; {hint}allowed keys: {', '.join(allowed)}")


def show(value, limit: int = 60) -> str:
    """A value as it appears in an error message: repr, one line, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_percent(text: str, where: str, key: str) -> float:
    """'10%' → 0.1."""
    try:
        value = float(text.strip()[:-1]) / 100.0
    except ValueError:
        raise fail(where, key, f"is {text[:40]!r}; write a percentage like '10%'") from None
    if not math.isfinite(value):
        raise fail(where, key, f"is {text[:40]!r}; a percentage must be finite")
    return value


def parse_budget(value, where: str, key: str | None = "budget") -> float:
    """0.1 or '10%' (fraction of the original parameters) or 20000 (a count) → the ShrinkOptions.budget number."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = parse_percent(value, where, key)
        if not 0 < number <= 1:
            raise fail(where, key, f"is {show(value)}; a percentage budget must be above 0% and at most 100%")
    elif isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            raise fail(where, key, f"is {show(value)}; use a fraction (0.1), a percentage ('10%') or a count (20000)") from None
    elif is_number(value):
        number = float(value)
    else:
        raise fail(where, key, f"is a {type(value).__name__}; use a fraction (0.1), a percentage ('10%') or a count")
    if not (0 < number < math.inf):
        raise fail(where, key, f"is {show(value)}; it must be positive and finite")
    if number > 1 and number != int(number):
        raise fail(where, key, f"is {show(value)}; above 1 it is a parameter count and must be a whole number")
    return number


def parse_max_error(value, where: str, key: str | None = "max-error") -> tuple[float | None, float | None]:
    """0.05 → (0.05, None): an absolute |Δy|; '1%' → (None, 1.0): a percentage of the largest output norm |y|."""
    if isinstance(value, str) and value.strip().endswith("%"):
        percent = parse_percent(value, where, key) * 100.0  # validates; then the number as written, for round trips
        percent = float(value.strip()[:-1])
        if not percent >= 0:
            raise fail(where, key, f"is {show(value)}; it must be ≥ 0")
        return None, percent
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise fail(where, key, f"is {show(value)}; use a number (|Δy|, e.g. 0.05) or a percentage of |y| ('1%')") from None
    if not is_number(value):
        raise fail(where, key, f"is a {type(value).__name__}; use a number (e.g. 0.05) or a percentage ('1%')")
    if not (0 <= value < math.inf):
        raise fail(where, key, f"is {show(value)}; it must be a finite number ≥ 0")
    return float(value), None


def parse_positive(value, where: str, key: str) -> float:
    if not is_number(value) or not (0 < value < math.inf):
        raise fail(where, key, f"is {show(value)}; it must be a positive finite number")
    return float(value)


def parse_choice(value, choices: tuple[str, ...], where: str, key: str) -> str:
    if value not in choices or not isinstance(value, str):
        raise fail(where, key, f"is {show(value)}; choose one of {', '.join(choices)}")
    return value


def parse_text(value, where: str, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()) or "\n" in value.strip():
        raise fail(where, key, f"is {show(value)}; it must be a {'' if allow_empty else 'non-empty '}one-line string")
    return value.strip()


def parse_path(value, where: str, key: str, base_dir: Path | None) -> str:
    """A path string; relative paths are taken relative to `base_dir` (the file that names them)."""
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\x00" in value:
        raise fail(where, key, f"is {show(value)}; it must be a file path (a one-line string)")
    text = value.strip()
    if base_dir is None or os.path.isabs(text):
        return text
    return os.path.normpath(os.path.join(base_dir, text))


def parse_formats(value, where: str, key: str | None = "formats") -> tuple[str, ...]:
    if isinstance(value, str):  # a flag: comma-separated
        if not [f for f in value.split(",") if f.strip()]:
            raise fail(where, key, f"is {show(value)}; give formats separated by commas: safetensors,onnx")
        value = [f.strip() for f in value.split(",") if f.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise fail(where, key, f"is {show(value)}; use a non-empty list like [\"safetensors\", \"onnx\"]")
    for item in value:
        parse_choice(item, FORMATS, where, key)
    if len(set(value)) != len(value):
        raise fail(where, key, f"lists a format twice: {show(list(value))}")
    return tuple(value)


def parse_fraction(value, where: str, key: str) -> float:
    """0.95 or "95%" → 0.95 (a fraction in [0, 1])."""
    if isinstance(value, str) and value.strip().endswith("%"):
        value = parse_percent(value, where, key)
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(where, key, f"is {show(value)}; use a fraction (0.95) or a percentage (\"95%\")") from None
    if not is_number(value) or not (0 <= value <= 1):
        raise fail(where, key, f"is {show(value)}; use a fraction between 0 and 1 (0.95) or a percentage (\"95%\")")
    return float(value)


def parse_radii(value, where: str, key: str = "certify-radius"):
    """The local certificates' ε: an absolute radius (0.05), a share of the median input norm of the certified points
    ("1%"), or several of either ("0.5%,1%,2%" on the command line, a list in a recipe) for a curve against ε.
    Returns one value (a float, or a normalised "1%" string) or, for several, a tuple of them in the order given."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (list, tuple)):
        if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, dict)) for v in items):
            raise fail(where, key, f"is {show(value)}; give numbers or percentages, not nested lists")
        parsed = [_one_radius(v, where, key) for v in items]
    else:
        parsed = [_one_radius(value, where, key)]
    if not parsed:
        raise fail(where, key, f"is {show(value)}; give at least one radius (0.05, \"1%\" or \"0.5%,1%,2%\")")
    if len(set(parsed)) != len(parsed):
        raise fail(where, key, f"lists a radius twice: {show(value)}")
    return parsed[0] if len(parsed) == 1 else tuple(parsed)


def _one_radius(value, where: str, key: str):
    hint = "; use an absolute radius (0.05), a percentage of the median input norm (\"1%\") or a list of them"
    if isinstance(value, str) and value.strip().endswith("%"):
        fraction = parse_percent(value, where, key)
        if not 0 < fraction < math.inf:
            raise fail(where, key, f"has {show(value.strip())}; a percentage radius must be above 0%{hint}")
        return f"{100.0 * fraction:.12g}%"
    if isinstance(value, str) and not value.strip():
        raise fail(where, key, f"has an empty entry{hint}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise fail(where, key, f"has {show(value.strip())}, which is not a number{hint}") from None
    if not is_number(value) or not (0 < value < math.inf):
        raise fail(where, key, f"has {show(value)}; a radius must be a positive finite number{hint}")
    return float(value)


def radius_fraction(radius) -> float | None:
    """The share of the median norm a "1%" radius stands for (0.01); None for an absolute radius."""
    return float(radius[:-1]) / 100.0 if isinstance(radius, str) else None


BYTE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
BYTES_RE = re.compile(r"^\s*([0-9][0-9_,]*(?:\.[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value, where: str, key: str = "max-bytes") -> int:
    """60000, "60000", "60 kB" (1000), "1.5 MiB" (1024²) → bytes."""
    if is_number(value):
        number, unit = float(value), "b"
    elif isinstance(value, str) and (match := BYTES_RE.match(value)):
        number, unit = float(match.group(1).replace("_", "").replace(",", "")), match.group(2) or "B"
    else:
        raise fail(where, key, f"is {show(value)}; write a size like 60000, \"60 kB\" or \"1.5 MiB\"")
    if unit.lower() not in BYTE_UNITS:
        raise fail(where, key, f"has unit {show(unit)}; use B, kB, MB, GB (powers of 1000) or KiB, MiB, GiB (1024)")
    unit = unit.lower()
    total = number * BYTE_UNITS[unit]
    if not (0 < total < 2**63) or total != math.floor(total) and unit == "b":
        raise fail(where, key, f"is {show(value)}; it must be a positive whole number of bytes")
    return int(round(total))


def parse_count(value, where: str, key: str = "max-params") -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9][0-9_,]*\s*", value):
        value = int(value.replace("_", "").replace(",", ""))
    if not isinstance(value, int) or isinstance(value, bool) or not (0 < value < 2**63):
        raise fail(where, key, f"is {show(value)}; it must be a positive whole number of parameters")
    return value
