"""The building blocks of the HTML run report (:mod:`fedjax_sim.experiment.report`):
PNG line plots, and the page's HTML pieces (tables, embedded images, sections).

Every piece of text goes through :func:`html.escape`; images are embedded as
``data:image/png;base64`` URIs, so a page needs no other file. Plots are drawn on a
:class:`matplotlib.figure.Figure` with the Agg canvas directly, never through ``pyplot``:
making a report changes no global matplotlib state (a notebook's backend and open figures
are left alone). matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, NamedTuple, Sequence


class Line(NamedTuple):
    """One curve: its legend label, x and y values, and matplotlib ``plot`` keywords."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    style: dict[str, Any] | None = None


class Panel(NamedTuple):
    """One set of axes: title, axis labels, curves, a log y axis, fixed y limits."""

    title: str
    xlabel: str
    ylabel: str
    lines: Sequence[Line]
    log_y: bool = False
    ylim: tuple[float, float] | None = None


def png(panels: Sequence[Panel], *, width: float = 5.2, height: float = 3.4,
        dpi: int = 90) -> bytes:
    """The panels side by side as PNG bytes (``width`` inches per panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * len(panels), height), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for line in panel.lines:
            marker = "o" if len(line.xs) <= 30 else None
            style = {"marker": marker, "markersize": 3, "linewidth": 1.5, **(line.style or {})}
            ax.plot(list(line.xs), list(line.ys), label=line.label, **style)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds
        ax.ticklabel_format(axis="y", useOffset=False)
        if panel.log_y and any(y > 0 for line in panel.lines for y in line.ys):
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if panel.lines:
            ax.legend(fontsize=8)
    # Fixed margins instead of tight_layout, which draws the figure once more (half the
    # time of a report).
    fig.subplots_adjust(left=0.12 / len(panels) + 0.02, right=0.98, bottom=0.15, top=0.9,
                        wspace=0.3)
    buf = io.BytesIO()
    # No "Software" text chunk: the PNG then holds no matplotlib URL.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1250px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:2px}
table{border-collapse:collapse;margin:.4em 0 1em}
th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f2f2f2}img{max-width:100%}figure{display:inline-block;margin:.4em}
figcaption{font-size:12px;color:#555;text-align:center}.note{color:#666;font-size:13px}"""


def escape(text: Any) -> str:
    """``text`` as HTML text or attribute value."""
    return html.escape(str(text), quote=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(v: Any) -> str:
    """A JSON value as table text: 4 significant digits, ``—`` for null, a list of
    strings joined by ``; ``."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return "; ".join(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def fmt_bytes(v: Any) -> str:
    """A byte count with thousands separators and in KiB/MiB/GiB."""
    if not _is_num(v):
        return fmt(v)
    size, unit = float(v), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(v):,} B" if unit == "B" else f"{int(v):,} B ({size:.1f} {unit})"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (``"data.num_clients"``)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]],
          table_id: str = "") -> str:
    """A table; each row's first cell is its header cell. Cells are escaped here."""
    ident = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in header or ())
    body = "".join(f"<tr><th>{escape(r[0])}</th>"
                   + "".join(f"<td>{escape(c)}</td>" for c in r[1:]) + "</tr>" for r in rows)
    return f"<table{ident}>" + (f"<tr>{head}</tr>" if head else "") + f"{body}</table>"


def img(data: bytes, alt: str) -> str:
    """PNG bytes as an ``<img>`` with a base64 ``data:`` URI."""
    text = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{text}" alt="{escape(alt)}">'


def plot(plot_id: str, panels: Sequence[Panel]) -> str:
    """The panels with curves as one embedded PNG in a ``<figure id=plot_id>`` whose
    ``data-series`` lists the curves' labels; ``""`` when no panel has a curve."""
    panels = [p for p in panels if p.lines]
    if not panels:
        return ""
    try:
        data = png(panels)
    except ImportError:
        return '<p class="note">(plots need matplotlib: pip install matplotlib)</p>'
    series = " | ".join(sorted({line.label for p in panels for line in p.lines}))
    return (f'<figure class="plot" id="{escape(plot_id)}" data-series="{escape(series)}">'
            + img(data, "; ".join(p.title for p in panels)) + "</figure>")


def grids(images: Sequence[tuple[int, str, bytes]]) -> str:
    """The leakage reconstruction grids ``(round, attacker, PNG bytes)``, captioned by
    round and attacker (empty: the honest-but-curious server)."""
    figures = "".join(
        f"<figure>{img(data, f'reconstruction, round {r}' + (f', {who}' if who else ''))}"
        f"<figcaption>round {r}{f', {escape(who)}' if who else ''}</figcaption></figure>"
        for r, who, data in images)
    return f'<div class="grids">{figures}</div>' if figures else ""


def section(section_id: str, title: str, parts: Sequence[str]) -> str:
    return (f'<section id="{escape(section_id)}"><h2>{escape(title)}</h2>' + "".join(parts)
            + "</section>")


def page(title: str, parts: Sequence[str]) -> str:
    """The whole HTML document: the inline CSS and the non-empty ``parts``."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")


__all__ = ["CSS", "Line", "Panel", "escape", "flatten", "fmt", "fmt_bytes", "grids", "img",
           "page", "plot", "png", "section", "table"]
