"""Loading the C++ extension `hf_sparse._C`, choosing its instruction set, and the thread count it uses.

Environment variables (read when `hf_sparse.ops` is imported):
    HF_SPARSE_ISA       auto | avx512_vnni | avx2_vnni | avx2 | scalar: force a lower instruction set.
    HF_SPARSE_THREADS   auto | openmp | pool: where the kernel threads come from. auto (default) runs them on
                        torch's own OpenMP threads when the process has libgomp loaded (torch's Linux wheels),
                        looked up at run time, never linked; else on hf_sparse's small std::thread pool.
    HF_SPARSE_SPIN_US   microseconds the pool's threads spin waiting for the next call before they sleep (50).
    HF_SPARSE_JIT=0     do not generate machine code for int8 4-block weights at pack time (the loops run instead;
                        docs/kernels.md, "Generated 4-block code").
    HF_SPARSE_DISABLE_EXTENSION=1   run the pure-torch reference kernels (slow; for debugging and tests).
    HF_SPARSE_DISABLE_CPU_FEATURES  e.g. avx512_vbmi,avx512_bf16: treat those CPU features as absent (tests).
    HF_SPARSE_POISON_SCRATCH=1      fill the kernels' scratch with NaN bytes at every use (tests: a kernel reading
                                    scratch it did not write shows it; slow).
"""

from __future__ import annotations

import os
import warnings

import torch


_ABI_VERSION = 13
_ISA_ENV = "HF_SPARSE_ISA"
_DISABLE_ENV = "HF_SPARSE_DISABLE_CPU_FEATURES"
_DISABLABLE = ("avx512_vbmi", "avx512_bf16")  # what csrc/isa.cpp lets the variable switch off

_C = None
_load_error: str | None = None
_num_threads: int | None = None


def _load():
    global _C, _load_error
    if os.environ.get("HF_SPARSE_DISABLE_EXTENSION", "") not in ("", "0"):
        _load_error = "disabled by HF_SPARSE_DISABLE_EXTENSION"
        return
    try:
        from hf_sparse import _C as ext
    except ImportError as e:
        _load_error = (
            f"the C++ extension hf_sparse._C is not built ({e}); reinstall with "
            "`pip install -e . --no-build-isolation` (needs a C++17 compiler, cmake and nanobind)"
        )
        return
    if ext.abi_version() != _ABI_VERSION:
        _load_error = (
            f"hf_sparse._C has ABI version {ext.abi_version()}, this Python code expects {_ABI_VERSION}: the "
            "extension is stale; rebuild with `pip install -e . --no-build-isolation`"
        )
        return
    disabled = [name.strip().lower() for name in os.environ.get(_DISABLE_ENV, "").split(",") if name.strip()]
    unknown = [name for name in disabled if name not in _DISABLABLE]
    if unknown:
        raise ValueError(
            f"{_DISABLE_ENV}={os.environ[_DISABLE_ENV]!r}: unknown feature(s) {unknown}; it takes a comma-separated "
            f"list of {', '.join(_DISABLABLE)}"
        )
    jit = os.environ.get("HF_SPARSE_JIT", "").strip()
    if jit not in ("", "0", "1"):
        raise ValueError(
            f"HF_SPARSE_JIT={jit!r}: use 0 (no generated code for int8 4-block weights) or 1 / unset (the default)"
        )
    threads = os.environ.get("HF_SPARSE_THREADS", "auto").strip() or "auto"
    try:
        ext.set_threads_backend(threads)
    except ValueError as e:
        raise ValueError(f"HF_SPARSE_THREADS={threads!r}: {e}") from None
    requested = os.environ.get(_ISA_ENV, "auto").strip() or "auto"
    try:
        ext.set_isa(requested)
    except ValueError as e:
        raise ValueError(f"{_ISA_ENV}={requested!r}: {e}") from None
    _C = ext


_load()
if _C is None:
    warnings.warn(
        f"hf_sparse.ops: {_load_error}. Falling back to the pure-torch reference kernels, which are correct but slow.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_available() -> bool:
    """Whether the C++ kernels are loaded (else every op runs its pure-torch reference)."""
    return _C is not None


def isa() -> str:
    """The instruction set the kernels run: 'avx512_vnni', 'avx2_vnni', 'avx2', 'scalar', or 'reference' (torch)."""
    return _C.isa() if _C is not None else "reference"


def available_isas() -> list[str]:
    """Instruction sets this machine and build can run, fastest first (empty without the extension)."""
    return list(_C.supported_isas()) if _C is not None else []


def quads_few_variant() -> str:
    """The int8 CSR few-token kernel of the active instruction set: "avx512_vbmi" (byte permutes), "avx512_vnni"
    (vpermt2d trees, CPUs without VBMI), or "none" (16-token tiles at every M)."""
    return _C.quads_few_variant() if _C is not None else "none"


def set_isa(name: str = "auto") -> None:
    """Switch the instruction set for all later calls ("auto" = the fastest). Packed weights stay valid."""
    if _C is None:
        raise RuntimeError(f"cannot select an instruction set: {_load_error}")
    _C.set_isa(name)


def set_num_threads(n: int | None) -> None:
    """Threads the kernels use; None (the default) follows `torch.get_num_threads()` at each call."""
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads(n): n must be a positive int or None, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """Threads the next kernel call will use."""
    return _num_threads if _num_threads is not None else torch.get_num_threads()


_FEW_TOKENS = "few_tokens:"  # prefix of the few-token kernel's counters in _C.kernel_calls()


def kernel_calls(kind: str = "linear") -> dict[str, int]:
    """Kernel calls so far (empty without the extension): tests assert that the fast path ran.

    kind "linear": the Linear kernels (fused FFN included) per instruction set; "few_tokens": of those, the calls
    that ran the few-token (decoding) int8 4-block kernel; "attention" / "layernorm": the attention /
    add_layernorm kernels per attention kernel name (`attention_isa()`); "jit": 64-token tiles multiplied by
    generated 4-block code (`{"avx512_vnni": n}`); "jit_pairs": of those, products that ran two tiles through
    each group's code at once (the encoder's feature-major path)."""
    kinds = ("linear", "few_tokens", "attention", "layernorm", "jit", "jit_pairs")
    if kind not in kinds:
        raise ValueError(f"kernel_calls(kind={kind!r}): kind must be one of {', '.join(map(repr, kinds))}")
    if _C is None:
        return {}
    if kind == "jit":
        return {"avx512_vnni": _C.jit_calls()}
    if kind == "jit_pairs":
        return {"avx512_vnni": _C.jit_pair_calls()}
    if kind in ("linear", "few_tokens"):
        calls = dict(_C.kernel_calls())
        if kind == "linear":
            return {name: n for name, n in calls.items() if not name.startswith(_FEW_TOKENS)}
        return {name[len(_FEW_TOKENS) :]: n for name, n in calls.items() if name.startswith(_FEW_TOKENS)}
    return dict(_C.attention_calls(kind == "layernorm"))


def threads_backend() -> str:
    """Where parallel kernel calls get their threads now: "openmp" (torch's OpenMP threads) or "pool"."""
    return _C.threads_backend() if _C is not None else "none"


def set_threads_backend(name: str) -> None:
    """ "auto", "openmp" or "pool" (see HF_SPARSE_THREADS in this module's docstring)."""
    if _C is None:
        raise RuntimeError(f"cannot select a threads backend: {_load_error}")
    _C.set_threads_backend(name)


def set_jit(enabled: bool) -> None:
    """Whether int8 4-block weights multiply through the machine code generated for them at pack time (default
    True; weights packed with HF_SPARSE_JIT=0, or on CPUs without AVX512-VNNI, have none and always run the
    loops). Results are identical either way: the switch exists for comparisons and debugging."""
    if not isinstance(enabled, bool):
        raise ValueError(f"set_jit(enabled): enabled must be a bool, got {enabled!r}")
    if _C is not None:
        _C.set_jit(enabled)


def jit_enabled() -> bool:
    """The `set_jit` switch (False without the extension)."""
    return bool(_C is not None and _C.jit_enabled())


def jit_available() -> bool:
    """Whether int8 4-block weights packed now get generated code (AVX512-VNNI, x86-64 Linux, not HF_SPARSE_JIT=0)."""
    return bool(_C is not None and _C.jit_available())


def set_spin_us(us: int) -> None:
    """Microseconds the kernel threads keep spinning for the next call before they sleep (HF_SPARSE_SPIN_US)."""
    if isinstance(us, bool) or not isinstance(us, int) or us < 0:
        raise ValueError(f"set_spin_us(us): us must be an int >= 0, got {us!r}")
    if _C is not None:
        _C.set_spin_us(us)
