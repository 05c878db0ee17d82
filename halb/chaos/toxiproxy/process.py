"""Run ``halb toxiproxy serve`` as a child process and wait until it answers.

The drill engine wants the fault proxy out of its own process (so killing or
freezing the engine's loop never stalls the data path). Readiness is signalled by
the server writing its bound port to ``--port-file``, so port 0 works without the
race of picking a free port in the parent.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO


@dataclass
class ToxiproxyProcess:
    """A ``halb toxiproxy serve`` child; use as a context manager or call start/stop."""

    host: str = "127.0.0.1"
    port: int = 0
    config: str | None = None
    startup_timeout: float = 20.0
    stderr: IO[bytes] | int | None = None  # default: inherit
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ToxiproxyProcess":
        with tempfile.TemporaryDirectory(prefix="halb-toxiproxy-") as tmp:
            port_file = os.path.join(tmp, "port")
            cmd = [sys.executable, "-m", "halb", "toxiproxy", "serve", "--host", self.host,
                   "--port", str(self.port), "--port-file", port_file]
            if self.config:
                cmd += ["--config", self.config]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=self.stderr)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"toxiproxy server exited early with code {self.proc.returncode}")
                try:
                    with open(port_file) as fh:
                        text = fh.read().strip()
                except FileNotFoundError:
                    text = ""
                if text.isdigit():
                    self.port = int(text)
                    if self._answers():
                        return self
                time.sleep(0.05)
            self.stop()
            raise RuntimeError("toxiproxy server did not become ready in time")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/version", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def __enter__(self) -> "ToxiproxyProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
