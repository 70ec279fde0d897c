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
from pathlib import Path

import torch

from blockmem.cache import cache_dir

_SOURCE = Path(__file__).with_name("decode_attention.c")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None  # why the kernels are unavailable, once a load was tried
MAX_ROWS, MAX_DIM, MAX_PARTS = 32, 256, 8  # the C source's limits (checked when it loads)


def available() -> bool:
    """True when the decode-attention kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


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
                    _library = _bind(ctypes.CDLL(str(_build())))
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _reason = str(error)
    return _library


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
    function = library.bm_attention_parts
    pointer, long, integer, single = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    function.argtypes = [integer, pointer, pointer, pointer, pointer, pointer, integer, integer, integer, integer,
                         single, pointer, pointer, integer]
    function.restype = integer
    if (library.bm_max_rows(), library.bm_max_dim(), library.bm_max_parts()) != (MAX_ROWS, MAX_DIM, MAX_PARTS):
        raise RuntimeError("the decode-attention kernel's limits do not match its wrapper")
    return library


Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q [Hkv, R, D], k [Hkv, S, D], v [Hkv, S, D]


def supports(parts: list[Part]) -> bool:
    """Whether `attention` takes these parts: all on the CPU, a few query rows per KV head, keys
    and values of one dtype (float32 or bfloat16) with contiguous rows, at least one key each."""
    if not 1 <= len(parts) <= MAX_PARTS:
        return False
    q0, k0, _ = parts[0]
    heads, rows, dim = q0.shape
    if rows > MAX_ROWS or dim > MAX_DIM or k0.dtype not in (torch.float32, torch.bfloat16):
        return False
    for q, k, v in parts:
        if (q.shape != q0.shape or k.device.type != "cpu" or q.device.type != "cpu" or k.dtype != k0.dtype
                or v.dtype != k0.dtype or k.shape[0] != heads or k.shape[1] < 1 or k.shape != v.shape
                or k.shape[2] != dim or k.stride(2) != 1 or v.stride(2) != 1):
            return False
    return available()


def attention(parts: list[Part], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the union of the parts' keys, each part scored with its own
    queries, no mask -> (out [Hkv, R, D] in the queries' dtype, lse [Hkv, R] float32). The same as
    merging `partial_attention` of each part. Call `supports` first."""
    library = _load()
    assert library is not None
    heads, rows, dim = parts[0][0].shape
    queries = [q.to(torch.float32).contiguous() for q, _, _ in parts]
    n = len(parts)
    q_array = (ctypes.c_void_p * n)(*[q.data_ptr() for q in queries])
    k_array = (ctypes.c_void_p * n)(*[k.data_ptr() for _, k, _ in parts])
    v_array = (ctypes.c_void_p * n)(*[v.data_ptr() for _, _, v in parts])
    strides = (ctypes.c_long * (4 * n))(*[x for _, k, v in parts for x in (k.stride(0), k.stride(1),
                                                                            v.stride(0), v.stride(1))])
    keys = (ctypes.c_int * n)(*[k.shape[1] for _, k, _ in parts])
    out = torch.empty(heads, rows, dim, dtype=torch.float32)
    lse = torch.empty(heads, rows, dtype=torch.float32)
    status = library.bm_attention_parts(n, q_array, k_array, v_array, strides, keys,
                                        int(parts[0][1].dtype == torch.bfloat16), heads, rows, dim, scale,
                                        out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"the decode-attention kernel refused {n} parts of q {tuple(parts[0][0].shape)} ({status})")
    return out.to(parts[0][0].dtype), lse
