"""Optional native kernels, each replacing one PyTorch call and tested against it.

`attention` (decode_attention.c): attention of a decode step's few query rows per KV head over
thousands of keys on the CPU, where PyTorch's flash kernel (built for blocks of queries) spends
~2.5x as long; it also merges several key sets (sinks and selected blocks, the window) in the
same call. It is compiled on first use with the system
C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`), into blockmem's cache folder
(`kernels/`, keyed by a hash of the source, flags and CPU), and loaded with ctypes: no build step
at install time and no PyTorch headers. Where no compiler is found or the build fails,
`available()` is False, `unavailable_reason()` says why, and attention keeps PyTorch's kernel.
`BLOCKMEM_KERNELS=0` turns the kernels off (to compare, or to rule them out).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from blockmem.cache import cache_dir

_SOURCE = Path(__file__).with_name("decode_attention.c")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable, once a load was tried
MAX_ROWS, MAX_DIM, MAX_PARTS = 32, 256, 4096  # the C source's limits (checked when it loads)
KEY_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """True when the decode-attention kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def describe(device: torch.device) -> str:
    """Which kernel a decode step's attention uses on `device`: "native", or "torch (why)"."""
    if device.type != "cpu":
        return f"torch ({device.type})"
    return "native" if available() else f"torch ({unavailable_reason()})"


def _load() -> ctypes.CDLL | None:
    global _library, _reason
    if _library is not None or _reason is not None:
        return _library
    with _lock:
        if _library is None and _reason is None:
            if os.environ.get("BLOCKMEM_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = "turned off by BLOCKMEM_KERNELS=0"
            else:
                try:
                    _library = _open()
                except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as error:
                    _reason = str(error)
    return _library


def _open() -> ctypes.CDLL:
    """Load the built kernel; a cached build that does not load (damaged, truncated, missing a
    symbol) is removed and built again once, never trusted."""
    path = _build()
    try:
        return _bind(ctypes.CDLL(str(path)))
    except (OSError, AttributeError, RuntimeError):
        path.unlink(missing_ok=True)
        return _bind(ctypes.CDLL(str(_build())))


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by machines of
    different CPUs must not hand one the other's instructions)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> Path:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler ({compiler}) on PATH to build the decode-attention kernel")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(),
                                        _cpu_signature().encode(), platform.machine().encode()]))
    target = cache_dir("kernels") / f"decode_attention-{digest.hexdigest()[:20]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # same file system: rename is atomic
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"building the decode-attention kernel failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    function = library.bm_attention
    pointer, integer, single = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    function.argtypes = [integer, integer, integer, integer, single, integer, pointer, pointer, pointer, pointer,
                         pointer, pointer, pointer, integer]
    function.restype = integer
    if (library.bm_max_rows(), library.bm_max_dim(), library.bm_max_parts()) != (MAX_ROWS, MAX_DIM, MAX_PARTS):
        raise RuntimeError("the decode-attention kernel's limits do not match its wrapper")
    return library


@dataclass(frozen=True)
class KeySet:
    """Where one part's keys and values lie for the kernel: per KV head the address of its first
    key row and first value row, the row strides in elements, how many keys, and their dtype.
    Addresses are raw: whoever builds one keeps the memory alive and unchanged until the call."""

    k: tuple[int, ...]
    v: tuple[int, ...]
    k_row: int
    v_row: int
    count: int
    dtype: torch.dtype


def key_set(k: torch.Tensor, v: torch.Tensor) -> KeySet | None:
    """The KeySet of k, v [Hkv, S, D] (views of anything), or None where the kernel cannot read
    them: not on the CPU, not float32/bfloat16, rows not contiguous, or no keys."""
    if (k.device.type != "cpu" or v.device.type != "cpu" or k.dtype not in KEY_DTYPES or v.dtype != k.dtype
            or k.shape != v.shape or k.shape[1] < 1 or k.stride(2) != 1 or v.stride(2) != 1):
        return None
    size = k.element_size()
    return KeySet(tuple(k.data_ptr() + h * k.stride(0) * size for h in range(k.shape[0])),
                  tuple(v.data_ptr() + h * v.stride(0) * size for h in range(v.shape[0])),
                  k.stride(1), v.stride(1), k.shape[1], k.dtype)


def supports(q: torch.Tensor, keys: list[KeySet | None]) -> bool:
    """Whether `attention` takes queries shaped like q [Hkv, R, D] over these key sets."""
    heads, rows, dim = q.shape
    return (q.device.type == "cpu" and rows <= MAX_ROWS and dim <= MAX_DIM and 1 <= len(keys) <= MAX_PARTS
            and all(ks is not None and len(ks.k) == heads and ks.dtype == keys[0].dtype for ks in keys)
            and available())


def attention(parts: list[tuple[torch.Tensor, KeySet]], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the union of the parts' keys, each part scored with its own
    queries q [Hkv, R, D] (parts may share one tensor), no mask -> (out [Hkv, R, D] in the
    queries' dtype, lse [Hkv, R] float32): what merging `partial_attention` of each part gives.
    Call `supports` first."""
    library = _load()
    assert library is not None
    first = parts[0][0]
    heads, rows, dim = first.shape
    as_float: dict[int, torch.Tensor] = {}  # each distinct query tensor converted once
    for q, _ in parts:
        if id(q) not in as_float:
            as_float[id(q)] = q.to(torch.float32).contiguous()
    n = len(parts)
    queries = (ctypes.c_void_p * n)(*[as_float[id(q)].data_ptr() for q, _ in parts])
    k_rows = (ctypes.c_void_p * (n * heads))(*[address for _, ks in parts for address in ks.k])
    v_rows = (ctypes.c_void_p * (n * heads))(*[address for _, ks in parts for address in ks.v])
    strides = (ctypes.c_long * (2 * n))(*[stride for _, ks in parts for stride in (ks.k_row, ks.v_row)])
    counts = (ctypes.c_int * n)(*[ks.count for _, ks in parts])
    out = torch.empty(heads, rows, dim, dtype=torch.float32)
    lse = torch.empty(heads, rows, dtype=torch.float32)
    status = library.bm_attention(n, heads, rows, dim, scale, int(parts[0][1].dtype == torch.bfloat16), queries,
                                  k_rows, v_rows, strides, counts, out.data_ptr(), lse.data_ptr(),
                                  torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the decode-attention kernel refused {n} parts of q {tuple(first.shape)} ({status})")
    return out.to(first.dtype), lse
