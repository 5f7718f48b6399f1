"""Self-contained HTML pages: inline CSS, figures embedded as base64 PNG data URIs.

A page is a list of fragments (strings of HTML) joined by :func:`document`;
the helpers here make escaped fragments. Numeric table cells carry their
unrounded value in ``data-value`` (Python ``repr``), so a reader — or a test —
gets the exact number behind the rounded text.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
.note { font-size: 0.85em; color: #555; }
"""


def esc(text: object) -> str:
    """HTML-escaped ``str(text)``."""
    return html.escape(str(text), quote=True)


def heading(text: str, level: int = 2, anchor: str | None = None) -> str:
    """``<hN>`` fragment, with an ``id`` when ``anchor`` is given."""
    if level not in range(1, 7):
        raise ValueError(f"heading level must be 1..6, got {level!r}")
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{esc(text)}</h{level}>"


def paragraph(text: str, css_class: str | None = None) -> str:
    """``<p>`` fragment."""
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return f"<p{cls}>{esc(text)}</p>"


def bullet_list(items: Sequence[str]) -> str:
    """``<ul>`` fragment (empty string for no items)."""
    if not items:
        return ""
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"


def png_data_uri(fig: "Figure", dpi: int = 110) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_file_data_uri(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(fig: "Figure | Path", caption: str = "", dpi: int = 110, name: str = "") -> str:
    """``<figure>`` fragment with the figure embedded as PNG.

    Args:
        fig: the figure, or a PNG file already written (embedded as is).
        caption: caption text.
        dpi: PNG resolution when ``fig`` is a figure.
        name: ``data-name`` attribute (the figure's file stem), for readers.
    """
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    data = f' data-name="{esc(name)}"' if name else ""
    src = png_file_data_uri(fig) if isinstance(fig, Path) else png_data_uri(fig, dpi)
    return f'<figure{data}><img alt="{esc(caption or name)}" src="{src}">{cap}</figure>'


def _cell(value: object, decimals: int) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f'<td data-value="{int(value)}">{int(value)}</td>'
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if math.isnan(v):
            return '<td data-value="nan">—</td>'
        return f'<td data-value="{v!r}">{v:.{decimals}f}</td>'
    if value is None:
        return '<td class="text">—</td>'
    return f'<td class="text">{esc(value)}</td>'


def table(df: "pd.DataFrame", decimals: int = 2, table_id: str | None = None, caption: str = "") -> str:
    """``<table>`` fragment: header row of column names, one row per DataFrame row.

    Floats are shown rounded to ``decimals`` and carry their exact value in
    ``data-value``; integers are shown whole; NaN and None show ``—``.

    Args:
        df: the table (its index is not shown).
        decimals: decimals shown.
        table_id: ``id`` attribute.
        caption: ``<caption>`` text.
    """
    ident = f' id="{esc(table_id)}"' if table_id else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(_cell(v, decimals) for v in row) + "</tr>"
        for row in df.astype(object).itertuples(index=False)
    )
    return f"<table{ident}>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def document(title: str, parts: Sequence[str]) -> str:
    """A complete HTML page from fragments (no external resources)."""
    body = "\n".join(p for p in parts if p)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{heading(title, 1)}\n{body}\n</body></html>\n"
    )


def write(path: Path, title: str, parts: Sequence[str]) -> Path:
    """Writes :func:`document` to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document(title, parts), encoding="utf-8")
    return path
