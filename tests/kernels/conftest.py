"""Kernel tests run the Triton kernels on CPU tensors in Triton's interpreter.

The interpreter is chosen when a kernel is decorated, so the variable must be set before any engine kernel
module is imported: this conftest is imported before the test modules of this folder.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
