"""Fused CPU kernels for the training pass (`fused_kernels.cpp`), built once per machine and cached.

Eager PyTorch runs the loss, the attention softmax and each residual add + layer norm as chains
of whole-tensor operations; on the demo model's CPU steps those chains cost more than the
arithmetic in them. The kernels in `fused_kernels.cpp` do each chain as one pass over rows.

They are compiled with the machine's C++ compiler through `torch.utils.cpp_extension` (ninja
drives the build) the first time training needs them (about 20 s), and cached under
`$SEQSERVE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/seqserve/kernels`, else
`~/.cache/seqserve/kernels`, keyed by the source, torch's version and the CPU's vector
instructions; `make install` builds them ahead (`python -m seqserve.model.kernels`). Where no
compiler is present, or the build fails, or `SEQSERVE_FUSED_KERNELS=0`, training runs the same
arithmetic as PyTorch operations and says why once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised, torch's own lock still applies
    fcntl = None  # type: ignore[assignment]

SOURCE = Path(__file__).with_name("fused_kernels.cpp")
SWITCH = "SEQSERVE_FUSED_KERNELS"  # "0" turns the kernels off
CACHE = "SEQSERVE_KERNEL_CACHE"
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write

_ops: Any = None
_reason: str | None = None  # why there are no kernels, once tried
_tried = False
_enabled = True


def cache_root() -> Path:
    if os.environ.get(CACHE):
        return Path(os.environ[CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seqserve" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    """Flags for the vector instructions torch itself dispatches to on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        flags = ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                 "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        if "avx512_bf16" in _cpu_flags():
            flags.append("-mavx512bf16")
    elif capability.startswith("AVX2"):
        flags = ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    else:
        flags = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    return ["-O3", *flags]


def build_dir() -> Path:
    """The cache folder of this source, torch and set of flags."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), torch.__version__.encode(),
                                     " ".join(compile_flags()).encode()])).hexdigest()[:16]
    return cache_root() / key


def _load(verbose: bool) -> Any:
    from torch.utils import cpp_extension

    folder = build_dir()
    name = f"seqserve_fused_{folder.name}"
    library, ready = folder / f"{name}.so", folder / "ready"
    if not ready.exists():  # written after a build loaded once; then the library is complete
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / "build.lock"):  # one build at a time (worker processes, torchrun's ranks)
            if not ready.exists():
                # torch's own lock file outlives a build that was killed (Ctrl-C in the first
                # `seqserve train`) and would make every later build wait for it forever; under
                # the lock above no other build is running, so any such file is stale
                (folder / "lock").unlink(missing_ok=True)
                print(f"seqserve: building the fused CPU kernels for this machine, once (about 20 s; "
                      f"cached in {folder})", file=sys.stderr, flush=True)
                start = time.monotonic()
                cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=compile_flags(),
                                   build_directory=str(folder), is_python_module=False, verbose=verbose)
                ready.write_text(f"built in {time.monotonic() - start:.0f} s\n")
                return torch.ops.seqserve_fused
    torch.ops.load_library(str(library))
    return torch.ops.seqserve_fused


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` that the system releases if this process dies (flock)."""
    with open(path, "a") as held:
        if fcntl is not None:
            fcntl.flock(held, fcntl.LOCK_EX)
        yield


def load(verbose: bool = False) -> Any:
    """The kernels' operator namespace (`torch.ops.seqserve_fused`), built if need be; None where
    they are switched off or cannot be built (`unavailable()` says why)."""
    global _ops, _reason, _tried
    if not _tried:
        _tried = True
        if os.environ.get(SWITCH, "1") == "0":
            _reason = f"{SWITCH}=0"
        else:
            try:
                _ops = _load(verbose)
            except Exception as exc:  # no compiler, no ninja, a failed build: PyTorch operations instead
                _reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                print(f"seqserve: no fused CPU kernels ({_reason}); training uses PyTorch operations",
                      file=sys.stderr, flush=True)
    return _ops


def disable(reason: str) -> None:
    """No kernels in this process from now on, without trying to build them (`unavailable()`
    gives the reason)."""
    global _ops, _reason, _tried
    _ops, _reason, _tried = None, reason, True


def unavailable() -> str | None:
    """Why `load()` gave no kernels, or None (not tried yet, or loaded)."""
    return _reason


def get(device: torch.device, dtype: torch.dtype) -> Any:
    """The kernels if they apply to tensors of this device and dtype (a CPU, a dtype they take)
    and are on, else None."""
    if not _enabled or device.type != "cpu" or dtype not in DTYPES:
        return None
    return load()


@contextlib.contextmanager
def switched(on: bool) -> Iterator[None]:
    """Within the block, the training pass and the loss use (on) or skip (off) the kernels."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def main() -> None:
    """`python -m seqserve.model.kernels`: build (or find) the kernels and say where they are."""
    ops = load(verbose="--verbose" in sys.argv)
    if ops is None:
        print(f"no fused kernels: {_reason}")
        return
    print(f"fused CPU kernels ready in {build_dir()}")


if __name__ == "__main__":
    main()
