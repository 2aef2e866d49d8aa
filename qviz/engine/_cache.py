"""One on-disk cache for everything qviz computes once: trained float models, sweep rows, the offline chart
bundle. A folder, a key per settings, atomic writes, and entries that heal.

- `folder(path)`: `path`, else $QVIZ_CACHE_DIR, else $XDG_CACHE_HOME/qviz (or ~/.cache/qviz).
- `key(settings)`: a short hash of the settings as canonical JSON; numpy scalars count as the Python
  numbers they hold, so `width=np.int64(128)` and `width=128` share an entry.
- `write_bytes` / `write_text` / `write_with`: to a temporary file with a name no other process or thread
  uses, then `os.replace`: a reader never sees half a file, and two writers of one entry never share a
  temporary file. A cache that cannot be written is a warning, never an error.
- `read(path, load, what)`: the entry's value, or None when it is missing; an entry that cannot be read or
  does not hold what it should is reported in a warning, removed, and treated as missing, so the caller
  recomputes it instead of failing on it forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache entry was unreadable or held the wrong thing; it was removed and will be recomputed."""


def folder(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path`, else $QVIZ_CACHE_DIR, else the user cache directory."""
    if path is None:
        user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qviz"
        path = os.environ.get("QVIZ_CACHE_DIR") or user_cache
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"cache must be a folder path (str or os.PathLike) or None, got {type(path).__name__}")
    return Path(path)


def plain(value):
    """JSON's view of values it does not know: numpy scalars and arrays as Python numbers and lists."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


def canonical(settings) -> str:
    return json.dumps(settings, sort_keys=True, default=plain)


def key(settings, length: int = 20) -> str:
    return hashlib.sha256(canonical(settings).encode()).hexdigest()[:length]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes(path: Path, data: bytes) -> Path | None:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> Path | None:
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: Path, save: Callable[[Path], None]) -> Path | None:
    """save(tmp) then rename tmp to path. A cache only saves time: when the folder cannot be written (read
    only, full, a directory in the way) the failure is a warning and the caller goes on without it."""
    tmp = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(tmp)
        os.replace(tmp, path)  # atomic on one file system
        return path
    except OSError as err:
        warnings.warn(f"could not write the cache entry {path} ({type(err).__name__}: {err}); going on without "
                      "caching it", CacheWarning, stacklevel=3)
        return None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def read(path: Path, load: Callable[[Path], T], what: str) -> T | None:
    """load(path), or None if there is no entry. A failing load (any exception: a truncated file, garbage,
    a stale format, a value that fails the loader's own checks) warns, removes the entry and returns None."""
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as err:  # any unreadable entry heals the same way: warn, remove, recompute
        warnings.warn(f"the cached {what} at {path} could not be used ({type(err).__name__}: {err}); it is "
                      "removed and will be computed again", CacheWarning, stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass  # a read-only cache: the entry stays, and is recomputed again next time
        return None
