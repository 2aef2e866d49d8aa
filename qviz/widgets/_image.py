"""Turn a grid of values into a PNG data URL for an Altair image mark.

A 200x200 decision map sent as 40,000 JSON rows costs megabytes per update; as a PNG it is a few tens
of kilobytes, and a data URL needs no network. Colours come from a fixed diverging ramp so that 0.5
(the decision boundary) is white.
"""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

# class 0 (blue) ... 0.5 (white) ... class 1 (red): the same colours the charts use for the points
_STOPS = np.array([[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]], dtype=np.float64)
# differences: -1 (green: quantized wrong where float was right)... 0 (white) ... +1 (purple)
_DIFF_STOPS = np.array([[27, 120, 55], [166, 219, 160], [247, 247, 247], [194, 165, 207], [118, 42, 131]],
                       dtype=np.float64)


def colorize(values: np.ndarray, lo: float = 0.0, hi: float = 1.0, stops: np.ndarray = _STOPS) -> np.ndarray:
    """uint8 RGB [h, w, 3] for values [h, w], linearly through `stops` between lo and hi."""
    t = np.clip((np.asarray(values, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0) * (len(stops) - 1)
    i = np.minimum(t.astype(np.int64), len(stops) - 2)
    f = (t - i)[..., None]
    return np.round(stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode uint8 RGB [h, w, 3] as a PNG (no dependencies beyond zlib)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


# class 0, class 1: darker than the map's own ends so the dots stand out on either colour
POINT_COLORS = np.array([[8, 48, 107], [103, 0, 13]], dtype=np.uint8)


def draw_points(rgb: np.ndarray, points: dict, extent: tuple[float, float], radius: int = 1) -> np.ndarray:
    """Dots for the training points on an image whose row 0 is the top (y = hi): baked into the picture
    because a thousand SVG circles make every redraw of the chart slow in the browser."""
    h, w, _ = rgb.shape
    lo, hi = extent
    cols = np.clip(((np.asarray(points["x"]) - lo) / (hi - lo) * w).astype(int), 0, w - 1)
    rows = np.clip(((hi - np.asarray(points["y"])) / (hi - lo) * h).astype(int), 0, h - 1)
    labels = np.asarray(points["label"]).astype(int)
    out = rgb.copy()
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)
            edge = max(abs(dr), abs(dc)) == radius and radius > 0
            out[r, c] = 255 if edge else POINT_COLORS[labels]
    return out


def data_url(grid: np.ndarray, lo: float = 0.0, hi: float = 1.0, *, diverging_difference: bool = False,
             points: dict | None = None, extent: tuple[float, float] = (0.0, 1.0), upscale: int = 2) -> str:
    """PNG data URL of grid [h, w] whose row 0 is the bottom (y = lo of the map), as a chart expects;
    optionally with the training `points` drawn on it (the picture is upscaled so dots stay small)."""
    stops = _DIFF_STOPS if diverging_difference else _STOPS
    rgb = colorize(np.asarray(grid)[::-1], lo, hi, stops)
    if points is not None:
        rgb = draw_points(np.repeat(np.repeat(rgb, upscale, axis=0), upscale, axis=1), points, extent)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")
