"""Figures for reports: PNG, SVG, PDF or self-contained HTML, all rendered offline by vl-convert.

`explorer.save(path)` picks the format from the extension. The HTML file inlines Vega, Vega-Lite and
vega-embed, so it opens with no kernel and no network; embed it in another page with an <iframe>.
"""

from __future__ import annotations

import os
from pathlib import Path

import altair as alt

from qviz import _checks

FORMATS = (".png", ".svg", ".pdf", ".html")


def png_bytes(spec: dict | alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    import vl_convert as vlc

    return vlc.vegalite_to_png(_as_dict(spec), scale=scale)


def _as_dict(spec: dict | alt.TopLevelMixin) -> dict:
    return spec if isinstance(spec, dict) else spec.to_dict()


def save_spec(spec: dict, path: str | os.PathLike, *, scale: float = 2.0) -> Path:
    """Write a Vega-Lite spec to `path` in the format its extension names (.png, .svg, .pdf, .html)."""
    import vl_convert as vlc

    path = Path(path)
    suffix = path.suffix.lower()
    _checks.choice("path suffix", suffix, FORMATS)
    scale = _checks.real("scale", scale, 0.0, 16.0, lo_open=True)
    spec = _as_dict(spec)
    if suffix == ".png":
        path.write_bytes(vlc.vegalite_to_png(spec, scale=scale))
    elif suffix == ".svg":
        path.write_text(vlc.vegalite_to_svg(spec), encoding="utf-8")
    elif suffix == ".pdf":
        path.write_bytes(vlc.vegalite_to_pdf(spec))  # vector output: no scale
    else:
        path.write_text(vlc.vegalite_to_html(spec, bundle=True), encoding="utf-8")
    return path
