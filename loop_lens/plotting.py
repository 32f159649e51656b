"""Plotly figures with untrusted text made inert.

plotly renders every label it draws (trace names in the legend, axis titles and tick labels,
categories, hover text, cell text, titles, annotations) through its own HTML subset: `<b>`,
`<span style=...>`, `<a href=...>` and `<br>` are markup, so a token's text could restyle a figure
or make the browser fetch a URL (`background-image:url(...)`). `safe_figure` HTML-escapes every
string of a figure (in place), whatever the field, so plotly shows each exactly as typed; only the
`hovertemplate` / `texttemplate` patterns loop_lens itself writes stay as they are. Every `plot*`
method of a `Result` passes its figure through it (see `loop_lens.result`), and the report
escapes each figure it embeds that has not been escaped yet.

This module imports nothing of loop_lens.
"""

from __future__ import annotations

import html
import weakref
from typing import Any

_KEEP = frozenset({"hovertemplate", "texttemplate", "template"})
"""Keys whose values are loop_lens's own plotly patterns (or plotly's theme), not data."""

_ESCAPED: dict[int, Any] = {}


def escape_strings(value: Any, key: str = "") -> Any:
    """`value` (a figure's JSON-like dict, list or scalar) with every string HTML-escaped, except
    under the keys in `_KEEP`."""
    if key in _KEEP:
        return value
    if isinstance(value, str):
        return html.escape(value, quote=False)
    if isinstance(value, dict):
        return {k: escape_strings(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [escape_strings(v, key) for v in value]
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") in ("U", "S", "O"):  # numpy arrays of text
        return [escape_strings(v, key) for v in value.tolist()]
    return value


def is_escaped(fig: Any) -> bool:
    """Whether `fig` came out of `safe_figure`."""
    ref = _ESCAPED.get(id(fig))
    return ref is not None and ref() is fig


def _escape_in_place(container: Any) -> None:
    """Escape every string inside a dict or list of plotly's raw figure storage, in place."""
    items = container.items() if isinstance(container, dict) else enumerate(container)
    for key, value in list(items):
        if isinstance(key, str) and key in _KEEP:
            continue
        if isinstance(value, (dict, list)):
            _escape_in_place(value)
        elif isinstance(value, (str, tuple)) or getattr(getattr(value, "dtype", None), "kind", "") in ("U", "S", "O"):
            container[key] = escape_strings(value, key if isinstance(key, str) else "")


def safe_figure(fig: Any) -> Any:
    """Plotly figure `fig` with every string HTML-escaped for plotly's HTML subset, in place (it
    is returned; anything that is not a figure is returned as it is; a figure escaped already is
    left alone, so nothing is escaped twice)."""
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - plotly is a dependency
        return fig
    if not isinstance(fig, go.Figure) or is_escaped(fig):
        return fig
    data, layout = getattr(fig, "_data", None), getattr(fig, "_layout", None)
    if isinstance(data, list) and isinstance(layout, dict):
        _escape_in_place(data)
        _escape_in_place(layout)
    else:  # pragma: no cover - another plotly's storage: rebuild from the JSON
        fig = go.Figure(escape_strings(fig.to_plotly_json()), skip_invalid=True)
    key = id(fig)
    _ESCAPED[key] = weakref.ref(fig, lambda _ref, key=key: _ESCAPED.pop(key, None))
    return fig
