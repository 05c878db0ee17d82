"""Consume a parsed TOML table key by key, so every error can name file, key and reason
and every leftover key is reported as unknown. Shared by node configs and drill files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

ErrorFactory = Callable[[Path, str, str], Exception]  # (file, dotted key, reason) -> exception


class Table:
    def __init__(self, file: Path, prefix: str, data: Any, error: ErrorFactory) -> None:
        if not isinstance(data, dict):
            raise error(file, prefix, f"must be a table, got {type(data).__name__}")
        self.file, self.prefix, self.data, self._error = file, prefix, dict(data), error

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> Exception:
        return self._error(self.file, self.key(name), reason)

    def sub(self, name: str, data: Any) -> "Table":
        """A nested table whose keys are reported under this one's prefix."""
        return Table(self.file, self.key(name), data, self._error)

    def take(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        if name not in self.data:
            if required or default is ...:
                raise self.error(name, "is required")
            return default
        return self.check(name, self.data.pop(name), kind)

    def check(self, name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
        """Type-check one value; ints are accepted where a float is wanted, bools never count as ints."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("number" if k is float else k.__name__ for k in kinds)
            raise self.error(name, f"must be a {names}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan
            raise self.error(name, f"must be a finite number, got {value!r}")
        return value

    def number(self, name: str, default: float, low: float = 0.0, high: float | None = None,
               low_open: bool = False) -> float:
        v = self.take(name, float, default)
        if v < low or (low_open and v == low) or (high is not None and v > high):
            rng = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise self.error(name, f"must be within {rng}, got {v:g}")
        return v

    def done(self) -> None:
        for name in self.data:
            raise self.error(name, "unknown key")


def read_toml(file: Path, error: ErrorFactory) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is reported like any other key error."""
    import tomllib

    try:
        return tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise error(file, "", "file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(file, "", f"not valid TOML: {exc}") from None
