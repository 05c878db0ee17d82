"""A minimal synchronous client of the Toxiproxy HTTP API, for the drill engine.

The drill engine only needs a handful of calls (create proxy, enable/disable, add and
remove toxics, reset). Talking plain HTTP keeps it working against halb's own fault proxy
and a real Toxiproxy server alike, without making `toxiproxy-python` (a test extra) a
runtime dependency.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class FaultProxyError(Exception):
    pass


@dataclass
class FaultProxy:
    url: str  # http://host:port
    timeout: float = 5.0

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "User-Agent": "halb-chaos"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw.strip() else None
        except urllib.error.HTTPError as exc:
            raise FaultProxyError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace').strip()}") from None
        except OSError as exc:
            raise FaultProxyError(f"{method} {path}: fault proxy at {self.url} unreachable: {exc}") from None

    def create(self, name: str, listen: str, upstream: str) -> str:
        """Create a proxy; returns its bound listen address (port 0 becomes a real port)."""
        out = self._call("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream, "enabled": True})
        return str(out["listen"])

    def set_enabled(self, name: str, enabled: bool) -> None:
        self._call("POST", f"/proxies/{name}", {"enabled": enabled})

    def add_toxic(self, proxy: str, name: str, type_: str, stream: str, toxicity: float,
                  attributes: dict[str, Any]) -> None:
        self._call("POST", f"/proxies/{proxy}/toxics", {"name": name, "type": type_, "stream": stream,
                                                         "toxicity": toxicity, "attributes": attributes})

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._call("DELETE", f"/proxies/{proxy}/toxics/{name}")

    def toxics(self, proxy: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/proxies/{proxy}/toxics") or [])

    def proxies(self) -> dict[str, Any]:
        return dict(self._call("GET", "/proxies") or {})

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._call("POST", "/reset")
