"""C kernels for CPU training, built with the machine's C compiler on first use and cached (``native/*.c``).

Eager PyTorch runs elementwise work one operation at a time, each a pass over memory; a C loop does a row's whole
formula in one pass while the row is in cache. ``load(name)`` compiles ``native/<name>.c`` into a shared library
once per machine and loads it with ``ctypes``::

    $CC (else cc, gcc, clang) -O3 -march=native -fno-trapping-math -fopenmp -fPIC -shared   (each optional flag
    dropped in turn where the compiler refuses it)

``-march=native`` builds for this CPU's vector units; ``-fno-trapping-math`` lets the compiler vectorize the
loops without reordering any arithmetic (no ``-ffast-math``: NaN and infinity keep their meaning, and the sums
are the ones the source writes); ``-fopenmp`` runs a kernel's rows on the threads torch uses, whose OpenMP runtime
the library then shares (same soname).

The library is cached under ``<loramix cache>/native/`` (``cache.cache_root``), named by a hash of the source, the
flags, the compiler's version and the CPU's feature flags, so a changed source, compiler or machine builds anew.
A failure (no compiler, a compile error, an unwritable cache, a library that does not load) is reported once with
a warning that says what failed and how to turn the kernels off, and ``load`` returns None: callers then run their
eager path. ``LORAMIX_NATIVE=0`` turns every kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..cache import cache_root

NATIVE = "LORAMIX_NATIVE"  # 0: no C kernels (every caller runs its eager path)
SOURCES = Path(__file__).with_name("native")
REQUIRED_FLAGS = ["-O3", "-fPIC", "-shared"]
OPTIONAL_FLAGS = ["-march=native", "-fno-trapping-math", "-fopenmp"]

Signatures = dict[str, tuple[list[Any], Any]]  # a library's functions: name → (argument types, return type)
_LOADED: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """Whether C kernels may be used at all (``LORAMIX_NATIVE`` is not 0)."""
    return os.environ.get(NATIVE, "1") != "0"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else the first of cc, gcc, clang on the PATH; None if none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def load(name: str, signatures: Signatures | None = None) -> ctypes.CDLL | None:
    """The library built from ``native/<name>.c``, built once per machine and loaded once per process; None (and
    one warning per process and kernel) where it cannot be built or loaded, or where ``LORAMIX_NATIVE=0``.
    ``signatures``: function name → (argument types, return type), set on the library when it is loaded."""
    if not enabled():
        return None
    if name not in _LOADED:
        try:
            library = ctypes.CDLL(str(_build(name)))
            for function, (argtypes, restype) in (signatures or {}).items():
                getattr(library, function).argtypes = argtypes
                getattr(library, function).restype = restype
            _LOADED[name] = library
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
            warnings.warn(f"loramix: the C kernel '{name}' is not used ({err}); its eager PyTorch path runs instead "
                          f"(slower on a CPU). Set {NATIVE}=0 to skip the attempt.", stacklevel=2)
            _LOADED[name] = None
    return _LOADED[name]


def _build(name: str) -> Path:
    """Compile ``native/<name>.c`` into the cache (atomically: concurrent processes may build it at once) unless it
    is there; returns the library's path. Raises RuntimeError naming the compiler's complaint."""
    source = SOURCES / f"{name}.c"
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([source.read_text(), cc, version, *REQUIRED_FLAGS, *OPTIONAL_FLAGS,
                                     platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    folder = _cache_folder()
    library = folder / f"{name}-{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / library.name
        errors = []
        for flags in _flag_sets():
            result = subprocess.run([cc, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode == 0:
                os.replace(built, library)
                return library
            errors.append(result.stderr.strip())
        raise RuntimeError(f"{cc} failed on {source}: {errors[0][-2000:]}")


def _flag_sets() -> list[list[str]]:
    """The flags to try, in order: all of them, then without one optional flag at a time (a compiler without OpenMP,
    an architecture that spells -march=native otherwise), then the required ones alone."""
    sets = [REQUIRED_FLAGS + OPTIONAL_FLAGS]
    sets += [REQUIRED_FLAGS + [f for f in OPTIONAL_FLAGS if f != dropped] for dropped in reversed(OPTIONAL_FLAGS)]
    return sets + [list(REQUIRED_FLAGS)]


def _cache_folder() -> Path:
    """``<loramix cache>/native``, made if missing; a fresh temporary folder where that cannot be written."""
    folder = cache_root() / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="loramix-native-"))


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines never loads another CPU's build."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""
