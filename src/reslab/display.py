"""Results in a notebook: an HTML table (`_repr_html_`) and a pandas DataFrame (`to_pandas`) from the same columns,
named as the command line's tables name them. pandas is imported only when a DataFrame is asked for."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import Any

from reslab.errors import ReslabError

STYLE = ("<style>.reslab table{border-collapse:collapse;font-family:monospace;font-size:12px}"
         ".reslab th,.reslab td{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
         ".reslab th:first-child,.reslab td:first-child{text-align:left}"
         ".reslab caption{text-align:left;font-weight:bold;padding:4px 0}</style>")

Cell = Callable[[Any], str]


def cell(value: Any, spec: str = "") -> str:
    """A value as the command line prints it: `spec` applied (stripped of its padding); None as '-'."""
    if value is None:
        return "-"
    return format(value, spec).strip() if spec else str(value)


def html_table(columns: dict[str, list[Any]], caption: str = "", formats: dict[str, str | Cell] | None = None,
               left: tuple[str, ...] = ()) -> str:
    """An HTML table, one column per entry of `columns` (its header the key), cells formatted by `formats` (a format
    spec or a function per column; str() otherwise) and escaped; the first column and those in `left` aligned left,
    the others right (numbers)."""
    formats = formats or {}
    align = {name: " style='text-align:left'" if name in left else "" for name in columns}

    def show(name: str, value: Any) -> str:
        how = formats.get(name, "")
        return escape(how(value) if callable(how) else cell(value, how))

    head = "".join(f"<th{align[name]}>{escape(name)}</th>" for name in columns)
    rows = zip(*columns.values()) if columns else []
    body = "".join("<tr>" + "".join(f"<td{align[name]}>{show(name, value)}</td>" for name, value in zip(columns, row))
                   + "</tr>" for row in rows)
    title = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_block(*parts: str, notes: tuple[str, ...] | list[str] = ()) -> str:
    """Tables (and SVG) in one styled block, with notes as plain lines below."""
    lines = "".join(f"<p>{escape(note)}</p>" for note in notes)
    return f"<div class='reslab'>{STYLE}{''.join(parts)}{lines}</div>"


def data_frame(columns: dict[str, list[Any]]):
    """A pandas DataFrame of the columns; one line naming the install when pandas is missing."""
    try:
        import pandas
    except ImportError:
        raise ReslabError("to_pandas() needs pandas, which is not installed: pip install pandas") from None
    return pandas.DataFrame(columns)
