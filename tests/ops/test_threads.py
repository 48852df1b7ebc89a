"""Threads: results independent of the thread count and of concurrent callers; fork safety; environment variables."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

from hf_sparse import ops
from hf_sparse.ops import Layout, pack_linear
from tests.ops.conftest import assert_close, assert_same, make_weight


needs_extension = pytest.mark.skipif(not ops.extension_available(), reason="needs the C++ extension")


def _backends():
    if not ops.extension_available():
        return ["none"]
    from hf_sparse import _C

    names = ["pool"]
    try:
        _C.set_threads_backend("openmp")
        names.append("openmp")
    except ValueError:
        pass
    finally:
        _C.set_threads_backend("auto")
    return names


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test on hf_sparse's thread pool and, where torch's OpenMP is loaded, on torch's threads."""
    if request.param != "none":
        ops.set_threads_backend(request.param)
        assert ops.threads_backend() == request.param
    yield request.param
    if request.param != "none":
        ops.set_threads_backend("auto")


def _weight(n=256, k=384, seed=0):
    return make_weight(n, k, 0.8, "4-block", torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", [Layout.INT8_BLOCK4, Layout.INT8_DENSE, Layout.FP32_CSR])
def test_results_do_not_depend_on_the_thread_count(layout, backend):
    scheme = "int8" if layout.value.startswith("int8") else "fp32"
    packed = pack_linear(_weight(), bias=torch.randn(256), scheme=scheme, layout=layout)
    results = []
    for m in (1, 5, 100, 130, 300):
        x = torch.randn(m, 384)
        outs = []
        for n in (1, 2, 3):
            ops.set_num_threads(n)
            try:
                outs.append(packed(x))
            finally:
                ops.set_num_threads(None)
        for n, y in zip((2, 3), outs[1:]):
            what = f"{layout.value}, m={m}: {n} threads vs 1"
            if scheme == "int8":  # exact integer sums: bit-identical whatever the split
                assert_same(y, outs[0], what)
            else:  # fp32 sums in another order when the tiles differ
                assert_close(y, outs[0], what, rtol=1e-5, atol=1e-4)
        results.append(outs[0])
    assert len(results) == 5


@needs_extension
def test_thread_count_follows_torch():
    from hf_sparse import _C

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    ops.set_threads_backend("pool")
    try:
        assert ops.get_num_threads() == 3
        packed = pack_linear(_weight(n=512, k=512))
        packed(torch.randn(256, 512))  # enough work for every thread
        assert _C.pool_size() >= 2
        ops.set_num_threads(1)
        assert ops.get_num_threads() == 1
    finally:
        ops.set_num_threads(None)
        torch.set_num_threads(before)
        ops.set_threads_backend("auto")
    with pytest.raises(ValueError, match="positive int"):
        ops.set_num_threads(0)


def test_concurrent_callers_share_a_packed_weight(backend):
    packed = pack_linear(_weight(), bias=torch.randn(256))
    xs = [torch.randn(m, 384, generator=torch.Generator().manual_seed(m)) for m in (3, 64, 130, 200)]
    expected = [packed(x) for x in xs]
    run_concurrently(packed, xs, expected, steps=15)


def test_concurrent_callers_share_a_fused_ffn(backend):
    gen = torch.Generator().manual_seed(1)
    first = pack_linear(make_weight(300, 384, 0.8, "4-block", gen), bias=torch.randn(300), activation="gelu")
    ffn = ops.fuse_ffn(first, pack_linear(make_weight(96, 300, 0.8, "4-block", gen)))
    xs = [torch.randn(m, 384, generator=gen) for m in (2, 64, 130, 200)]
    expected = [ffn.second(ffn.first(x)) for x in xs]
    run_concurrently(ffn, xs, expected, steps=10)


def _child(queue, packed, x):
    # torch's own OpenMP pool hangs after fork (libgomp), so torch runs single-threaded here; ours gets 2 threads.
    torch.set_num_threads(1)
    ops.set_num_threads(2)
    queue.put([packed(x).numpy().tobytes(), pack_linear(_weight())(x).numpy().tobytes()])


@needs_extension
@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_kernels_work_in_a_forked_child():
    packed, x = pack_linear(_weight()), torch.randn(200, 384)
    ops.set_num_threads(2)
    try:
        expected = packed(x)  # the parent's pool is started (and busy-waiting) when the child is forked
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, packed, x))
        proc.start()
        results = queue.get(timeout=60)
        proc.join(timeout=10)
    finally:
        ops.set_num_threads(None)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the forked child hung: its thread pool was not reset")
    assert results == [expected.numpy().tobytes()] * 2, "different results in the forked child"


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


@needs_extension
def test_environment_variables():
    code = (
        "import warnings, torch\n"
        "from hf_sparse import ops\n"
        "w = torch.randn(40, 70); x = torch.randn(5, 70)\n"
        "p = ops.pack_linear(w)\n"
        "err = float((p(x) - p.reference(x)).abs().max())\n"
        "print(ops.isa(), ops.kernel_calls().get(ops.isa(), 0), err, ops.threads_backend())\n"
    )
    forced = _run_python(code, HF_SPARSE_ISA="scalar", HF_SPARSE_THREADS="pool")
    assert forced.returncode == 0, forced.stderr
    isa, calls, err, threads = forced.stdout.split()
    assert isa == "scalar" and int(calls) == 1 and float(err) == 0.0 and threads == "pool"

    bad = _run_python(code, HF_SPARSE_ISA="avx9000", HF_SPARSE_THREADS="fibers")
    assert bad.returncode != 0 and "HF_SPARSE_THREADS='fibers'" in bad.stderr and "known: auto, pool" in bad.stderr
    bad = _run_python(code, HF_SPARSE_ISA="avx9000")
    assert bad.returncode != 0 and "HF_SPARSE_ISA='avx9000'" in bad.stderr and "known: auto" in bad.stderr

    fallback = _run_python(code, HF_SPARSE_DISABLE_EXTENSION="1")
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stdout.split()[0] == "reference" and float(fallback.stdout.split()[2]) == 0.0
    assert fallback.stderr.count("Falling back to the pure-torch reference kernels") == 1


def run_concurrently(call, xs, expected, steps: int, callers: int = 4) -> None:
    """`callers` Python threads call `call` on the inputs in turn, `steps` times each; every result must equal
    `expected` exactly, and no caller may hang."""
    errors = []

    def work(tid: int):
        try:
            for step in range(steps):
                i = (tid + step) % len(xs)
                if not torch.equal(call(xs[i]), expected[i]):
                    errors.append(f"thread {tid} step {step}: result differs for input {i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not errors, errors[:3]
