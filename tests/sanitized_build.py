"""Build one of halb's C extensions with AddressSanitizer + UBSan and re-run a fuzz script
against it (used by tests/fuzz_fasthttp.py and tests/fuzz_tcprelay.py; not part of `make test`).

The sanitized module goes into a temporary directory; the script is started again as a
child with `--child DIR --seconds N`, the sanitizer runtimes preloaded and
PYTHONMALLOC=malloc, so every bytes object is its own heap block that ASan can guard. A
finding aborts the child with the sanitizer's report and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def build_and_rerun(source: str, module: str, script: str, seconds: int, extra_cflags: tuple[str, ...] = ()) -> int:
    """Compile ROOT/source as `module` with the sanitizers and run `script --child` on it."""
    cc = shutil.which("gcc")
    if cc is None:
        print("SKIP: gcc not found")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix=f"halb-asan-{module.strip('_')}-"))
    try:
        so = tmp / (module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        subprocess.run([cc, "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer", *extra_cflags,
                        "-fsanitize=address,undefined", "-I", sysconfig.get_paths()["include"],
                        str(ROOT / source), "-o", str(so)], check=True)
        runtimes = [subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                    for lib in ("libasan.so", "libubsan.so")]
        env = dict(os.environ, PYTHONMALLOC="malloc", LD_PRELOAD=":".join(runtimes),
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        return subprocess.run([sys.executable, script, "--child", str(tmp), "--seconds", str(seconds)],
                              env=env, cwd=str(ROOT)).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_sanitized(moddir: str, module: str, *paths: Path) -> Any | None:
    """In the child: import the sanitized `module` from `moddir` (`paths` go on sys.path
    too, the repository by default). None, reported, when this process did not load the
    sanitized build with the ASan runtime (the fuzz then proves nothing)."""
    for path in (paths or (ROOT,)):
        sys.path.insert(0, str(path))
    sys.path.insert(0, moddir)
    mod = importlib.import_module(module)
    if not sanitized_module_loaded(moddir):
        print("error: the sanitized build or the ASan runtime is not loaded", file=sys.stderr)
        return None
    return mod


def sanitized_module_loaded(moddir: str) -> bool:
    """The child really runs the sanitized build with the ASan runtime (not the normal module)."""
    maps = Path("/proc/self/maps").read_text()
    return "libasan" in maps and moddir in maps


def main(doc: str | None, source: str, module: str, script: str, fuzz: Callable[[str, int], int],
         extra_cflags: tuple[str, ...] = ()) -> int:
    """The fuzz scripts' command line: build and re-run as a child, or (`--child DIR`) fuzz."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return fuzz(args.child, args.seconds)
    return build_and_rerun(source, module, script, args.seconds, extra_cflags)
