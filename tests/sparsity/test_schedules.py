import pytest

from hf_sparse.sparsity.schedules import SCHEDULES, Timeline


def cubic(step, start, end, s_i, s_f):
    x = min(1.0, max(0.0, (step - start) / (end - start)))
    return s_f + (s_i - s_f) * (1 - x) ** 3


def test_cubic_matches_zhu_gupta_closed_form():
    tl = Timeline(start=10, end=110, update_every=10)
    sched = SCHEDULES.get("cubic")()
    for step in range(10, 111, 10):
        assert sched.sparsity(step, tl, 0.7, 0.9) == pytest.approx(cubic(step, 10, 110, 0.7, 0.9), abs=1e-12)
    assert sched.sparsity(10, tl, 0.7, 0.9) == pytest.approx(0.7)
    assert sched.sparsity(110, tl, 0.7, 0.9) == pytest.approx(0.9)


def test_linear():
    tl = Timeline(0, 100, 1)
    assert SCHEDULES.get("linear")().sparsity(25, tl, 0.0, 0.8) == pytest.approx(0.2)


def test_update_steps_include_start_every_n_and_end():
    tl = Timeline(start=5, end=27, update_every=10)
    cubic_sched = SCHEDULES.get("cubic")()
    steps = [s for s in range(0, 40) if cubic_sched.is_update_step(s, tl)]
    assert steps == [5, 15, 25, 27]
    assert tl.last_update_at_or_before(20) == 15
    assert tl.last_update_at_or_before(4) is None
    assert tl.last_update_at_or_before(99) == 27


def test_one_shot_and_constant_prune_only_at_start():
    tl = Timeline(3, 3, 1)
    for name in ("one-shot", "constant"):
        sched = SCHEDULES.get(name)()
        assert [s for s in range(10) if sched.is_update_step(s, tl)] == [3]
    assert SCHEDULES.get("constant")().keeps_existing
