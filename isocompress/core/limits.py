"""Bounded parsing (issue 13): size and nesting limits checked on the text of TOML and JSON inputs *before* a parser
sees it, so that a recipe, check config, --baseline or safetensors metadata nested thousands of levels deep is a
one-line input error instead of a RecursionError. Also: JSON numbers that do not fit a float64."""

from __future__ import annotations

import json
import math

from isocompress.core.errors import IsocompressError

MAX_DEPTH = 64  # arrays/tables/objects inside one another; real recipes, configs and reports use ≤ 5
MAX_TEXT_BYTES = 4 << 20  # recipes, check configs, model config metadata
MAX_BASELINE_BYTES = 64 << 20  # a --baseline (a report.json or a `check --json` output)


def check_text(text: str, where: str, what: str, toml: bool, max_bytes: int = MAX_TEXT_BYTES,
               max_depth: int = MAX_DEPTH) -> None:
    """Raises IsocompressError if `text` is longer than max_bytes or nests brackets deeper than max_depth (brackets
    inside strings and, for TOML, comments do not count)."""
    if len(text) > max_bytes:
        raise IsocompressError(f"{where}: is {len(text):,} characters; a {what} is limited to {max_bytes:,}")
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = nesting_depth(text, toml)
    if depth > max_depth:
        raise IsocompressError(f"{where}: nests {depth} levels deep; a {what} may nest at most {max_depth}"
                               " (arrays and tables inside one another); flatten it")


def nesting_depth(text: str, toml: bool) -> int:
    """The deepest bracket nesting outside strings (and TOML comments); stops counting once far beyond any limit."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == '"' or (toml and c == "'"):
            i = _skip_string(text, i, escapes=(c == '"'))
            continue
        elif toml and c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        i += 1
    return deepest


def _skip_string(text: str, i: int, escapes: bool) -> int:
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        while escapes and end > 0 and _escaped(text, end):
            end = text.find(quote * 3, end + 1)
        return len(text) if end < 0 else end + 3
    j = i + 1
    while j < len(text):
        if text[j] == "\\" and escapes:
            j += 2
            continue
        if text[j] == quote or text[j] == "\n":
            return j + 1
        j += 1
    return j


def _escaped(text: str, pos: int) -> bool:
    backslashes = 0
    while pos - 1 - backslashes >= 0 and text[pos - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def check_parsed_depth(data, where: str, what: str, max_depth: int = MAX_DEPTH) -> None:
    """The same limit on a parsed value (TOML dotted keys `a.b.c…` nest without brackets). Iterative."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise IsocompressError(f"{where}: nests more than {max_depth} levels deep; a {what} may nest at most"
                                   f" {max_depth}; flatten it")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _bad_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows here")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the float64 range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 308:
        raise ValueError(f"an integer of {len(text)} digits is beyond the float64 range")
    return int(text)


def loads_json(text: str, where: str, what: str, max_bytes: int = MAX_TEXT_BYTES):
    """json.loads with the size/nesting limits, and without NaN, Infinity or numbers beyond float64. Raises
    ValueError (json.JSONDecodeError or ours) for bad JSON, IsocompressError for a limit."""
    check_text(text, where, what, toml=False, max_bytes=max_bytes)
    try:
        return json.loads(text, parse_constant=_bad_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise IsocompressError(f"{where}: nests too deeply; flatten the {what}") from None


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the OS says (MemAvailable, an address-space limit), or None."""
    candidates = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # POSIX only (not on Windows)

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as handle:
                used = int(handle.read().split()[0]) * resource.getpagesize()
            candidates.append(max(soft - used, 0))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(candidates) if candidates else None


def check_memory(needed: int, what: str, advice: str) -> None:
    """IsocompressError if `needed` bytes clearly exceed what is available."""
    free = available_memory()
    if free is not None and needed > free:
        raise IsocompressError(f"{what} needs about {needed / 2**30:.3g} GiB of memory but only {free / 2**30:.3g} GiB"
                               f" is available; {advice}")
