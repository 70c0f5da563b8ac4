"""Every ISA path of a C kernel file, runnable on this machine: the native build and, on x86, the
AVX2 (x86-64-v3, where the CPU has AVX2 and FMA) and plain-C (x86-64) builds, which run on any
x86-64 CPU."""
from __future__ import annotations

import platform
from typing import Callable, TypeVar

K = TypeVar("K")


def isa_builds(native: K | None, make: Callable[[str], K]) -> dict[str, K]:
    """``{"native": native, "x86-64-v3": make("x86-64-v3"), "x86-64": make("x86-64")}`` as far as
    this machine runs them; ``make(march)`` builds and loads the kernels for ``-march=march``."""
    assert native is not None, "the C kernels did not build (is gcc installed?): see the warning logged"
    builds = {"native": native}
    if platform.machine() == "x86_64":
        flags = open("/proc/cpuinfo").read()
        if " avx2 " in flags and " fma " in flags:
            builds["x86-64-v3"] = make("x86-64-v3")
        builds["x86-64"] = make("x86-64")
    return builds
