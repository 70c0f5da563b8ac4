"""Compiles the project's C kernels at first use and caches the shared objects per machine.

Each source is built with the system C compiler (gcc/cc) for ``-march=native`` in about a second,
into ``~/.cache/paged-engine/`` (``XDG_CACHE_HOME`` moves it), keyed by the source, the compiler,
the flags and the CPU model and flags: a machine never loads a build made for another CPU.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "paged-engine"


def build(source: Path, march: str = "native", out_dir: Path | None = None) -> Path:
    """Compiles ``source`` for ``-march=march`` (cached); returns the .so path. Raises RuntimeError
    when there is no compiler or the build fails."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    flags = [*FLAGS, f"-march={march}"]
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what its #includes may read
    key = hashlib.sha256("\0".join([source.read_text(), *headers, cc, *flags, cpu_identity()]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    out = out_dir / f"{source.stem}-{march}-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, out)  # atomic: concurrent builders (TP workers) never see half a file
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {source.name} failed:\n{e.stderr}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
