"""What the benchmark modules share: reading their YAML config strictly."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List


def merge_config(cfg: Dict[str, Any], defaults: Dict[str, Any], where: str, opaque: Iterable[str] = ()) -> Dict[str, Any]:
    """``defaults`` overlaid with ``cfg``, nested mappings merged key by key.

    Args:
        cfg: The benchmark's YAML mapping (possibly partial).
        defaults: Every allowed key with its default; a mapping value is a section.
        where: What to call the config in errors, e.g. ``"bench memory"``.
        opaque: Section names taken as given, not merged (validated elsewhere).

    Raises:
        ValueError: an unknown key (the valid ones are listed), or a section that is not a mapping.
    """
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where} config; valid: {sorted(defaults)}")
    opaque = set(opaque)
    out: Dict[str, Any] = {}
    for key, default in defaults.items():
        value = cfg.get(key, default)
        if isinstance(default, dict) and key not in opaque:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping with keys from {sorted(default)}, got {value!r}")
            value = merge_config(value, default, f"{where} {key}", opaque)
        out[key] = value
    return out


def table_lines(header: List[str], rows: List[List[str]]) -> List[str]:
    """A plain-text table: a header, a dashed rule, the rows; first column left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])])
            for line in [header, ["-" * w for w in widths]] + rows]


def print_table(header: List[str], rows: List[List[str]]) -> None:
    """Prints :func:`table_lines`."""
    print("\n".join(table_lines(header, rows)))
