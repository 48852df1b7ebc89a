"""Fixtures of the hf_sparse.nn tests."""

from __future__ import annotations

import pytest

from hf_sparse import ops


@pytest.fixture
def threads():
    """`threads(n)` sets the kernels' thread count for the test; the default comes back afterwards."""

    def use(n):
        ops.set_num_threads(n)

    yield use
    ops.set_num_threads(None)
