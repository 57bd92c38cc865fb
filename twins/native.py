"""Native CPU kernels (`native.cpp`), compiled on first use with the machine's C++ compiler.

They fuse element-wise passes that PyTorch runs as separate kernels. Each has a pure-PyTorch
equivalent in `kernels.py`, which runs wherever they are unavailable: no C++ compiler or ninja,
a CPU without AVX2, a build that fails (one warning says why), or `TWINS_NATIVE=0` in the
environment. The build takes a few seconds, once: `torch.utils.cpp_extension` caches it (under
`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions) and rebuilds it when the source or
the flags change; concurrent processes (torchrun) wait for one build.
"""
import logging
import os
import platform
import re
import shutil
import sysconfig
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("native.cpp")

# Compiler flags per ATen CPU capability: the same vector code as PyTorch's own kernels built for
# that capability (`at::vec::Vectorized` picks its implementation by CPU_CAPABILITY_*).
# -ffp-contract=off: no fused multiply-adds beyond the ones the code asks for.
_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]

_lock = threading.Lock()
_state = {"tried": False, "ops": None}


def disabled() -> bool:
    """Whether the environment turns the native kernels off (TWINS_NATIVE=0)."""
    return os.environ.get("TWINS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def capability() -> Optional[str]:
    """The vector instruction set the kernels are built for on this CPU, or None (no build)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if cap == "AVX2" else None


def ops():
    """The `torch.ops.twins_native` operators, built on the first call; None where the native
    kernels are unavailable or turned off (callers then run their PyTorch equivalent)."""
    if disabled():
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["ops"] = _build()
                _state["tried"] = True
    return _state["ops"]


def status() -> str:
    """What runs here, for logs: the instruction set the kernels were built for, or why none."""
    if disabled():
        return "off (TWINS_NATIVE=0)"
    return f"built for {capability()}" if ops() is not None else "unavailable"


def _build():
    cap = capability()
    if cap is None:
        return None
    # cpp_extension logs a warning about the missing CUDA runtime when it is imported by a CUDA
    # build of PyTorch on a machine without a GPU; these kernels are CPU-only.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    path = os.environ.get("PATH")
    try:
        from torch.utils import cpp_extension
        scripts = sysconfig.get_path("scripts")  # pip's `ninja` lives beside this Python
        if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
            os.environ["PATH"] = os.pathsep.join(p for p in (scripts, path) if p)
        cpp_extension.load(name=f"twins_native_{cap.lower()}", sources=[str(SOURCE)],
                           extra_cflags=_COMMON_FLAGS + _FLAGS[cap], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch paths run
        warnings.warn(f"twins: native CPU kernels unavailable, using the PyTorch implementations "
                      f"({type(e).__name__}: {_reason(str(e))}; TWINS_NATIVE=0 skips the build)",
                      RuntimeWarning, stacklevel=3)
        return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
        logger.setLevel(level)
    return torch.ops.twins_native


def _reason(message: str) -> str:
    """The line of a build failure's output that says what went wrong: the first naming an error
    or a missing program (the compiler's output comes before ninja's last words), else the last."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if re.search(r"error:|not found|no such file", line, re.IGNORECASE):
            return line
    return lines[-1] if lines else "no message"
