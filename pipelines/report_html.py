"""HTML building blocks of the run report: escaped tables, Markdown, the plan's tables.

Every value that comes from a file goes through :func:`escape` (or Markdown rendering with
raw HTML turned off), so a class name or a check name can never inject markup.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    header_rows: Sequence[str] = (),
    caption: str | None = None,
) -> str:
    """A ``<table>``: ``headers`` and cells escaped; ``header_rows`` are ready-made
    ``<tr>`` rows placed above the header (grouped column titles)."""
    head = "".join(f"<th>{escape(name)}</th>" for name in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    title = f"<caption>{escape(caption)}</caption>" if caption else ""
    return (
        f"<table>{title}<thead>{''.join(header_rows)}<tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{body}</section>'


def paragraph(text: str, css_class: str | None = None) -> str:
    attribute = f' class="{escape(css_class)}"' if css_class else ""
    return f"<p{attribute}>{escape(text)}</p>"


def relative_link(target: Path, page_dir: Path, text: str) -> str:
    """An ``<a>`` to ``target`` relative to the page's folder: it works offline, from the
    file system, wherever the project folder is."""
    relative = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    href = quote(Path(relative).as_posix())
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def markdown_html(text: str) -> str:
    """CommonMark with tables, raw HTML shown as text (never passed through)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _cell(value: Any) -> str:
    """A plan value as table text: lists joined, a list of rules one ``key=value`` group
    each."""
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={_cell(item)}" for key, item in value.items())
    if isinstance(value, list):
        separator = "; " if any(isinstance(item, Mapping) for item in value) else ", "
        return separator.join(_cell(item) for item in value)
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"  # a learning rate, not its binary rounding error
    return str(value)


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``a.b`` keys (``augment.flip``); lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def plan_tables(plan: Mapping[str, Any]) -> str:
    """plan.json as tables: its single values; its settings sections side by side (the
    fine-tuning and from-scratch runs); each list of records (learning rates) on its own."""
    singles = [(key, _cell(value)) for key, value in plan.items() if not _is_compound(value)]
    sections = {key: _flatten(value) for key, value in plan.items() if isinstance(value, Mapping)}
    records = {
        key: value
        for key, value in plan.items()
        if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value)
    }
    parts = [table(["setting", "value"], singles)] if singles else []
    # Sections with settings in common (fine-tuning, from scratch) side by side; one that
    # shares none (the class-balance decision) in a table of its own.
    alone = {
        key: flat
        for key, flat in sections.items()
        if not any(set(flat) & set(other) for name, other in sections.items() if name != key)
    }
    side_by_side = {key: flat for key, flat in sections.items() if key not in alone}
    if side_by_side:
        names = list(dict.fromkeys(name for flat in side_by_side.values() for name in flat))
        rows = [
            [name, *(_cell(flat[name]) if name in flat else "" for flat in side_by_side.values())]
            for name in names
        ]
        parts.append(table(["setting", *side_by_side], rows))
    for key, flat in alone.items():
        rows = [[name, _cell(value)] for name, value in flat.items()]
        parts.append(table(["setting", "value"], rows, caption=key.replace("_", " ")))
    for key, items in records.items():
        columns = list(dict.fromkeys(column for item in items for column in item))
        rows = [[_cell(item.get(column, "")) for column in columns] for item in items]
        parts.append(table(columns, rows, caption=key.replace("_", " ")))
    return f'<div class="plan">{"".join(parts)}</div>'


def _is_compound(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and any(isinstance(item, Mapping) for item in value)
    )
