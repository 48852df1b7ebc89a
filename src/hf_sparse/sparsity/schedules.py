"""Sparsity schedules: the target sparsity at each pruning step between `start` and `end`."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.registry import Registry


SCHEDULES: Registry[type[Schedule]] = Registry("schedule", field="schedule")


@dataclass(frozen=True)
class Timeline:
    """When pruning happens, in optimizer steps: at `start`, every `update_every` steps after it, and at `end`."""

    start: int
    end: int
    update_every: int

    def is_update_step(self, step: int) -> bool:
        if step < self.start or step > self.end:
            return False
        return (step - self.start) % self.update_every == 0 or step == self.end

    def progress(self, step: int) -> float:
        """Fraction of the way from start (0.0) to end (1.0)."""
        if self.end <= self.start:
            return 1.0
        return min(1.0, max(0.0, (step - self.start) / (self.end - self.start)))

    def last_update_at_or_before(self, step: int) -> int | None:
        if step < self.start:
            return None
        if step >= self.end:
            return self.end
        return self.start + (step - self.start) // self.update_every * self.update_every


class Schedule:
    """Maps a pruning step to a target sparsity, from `initial` (jumped to at start) to `final` (reached at end)."""

    #: prune only at `start` (the other update steps are skipped)
    only_at_start: bool = False
    #: keep the zeros already in the weights instead of pruning to a target
    keeps_existing: bool = False

    def sparsity(self, step: int, timeline: Timeline, initial: float, final: float) -> float:
        raise NotImplementedError

    def is_update_step(self, step: int, timeline: Timeline) -> bool:
        if self.only_at_start:
            return step == timeline.start
        return timeline.is_update_step(step)


@SCHEDULES.register("cubic")
class CubicSchedule(Schedule):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - x)^3 with x the progress from start to end.

    Prunes fast early, while the network can still recover, and slowly near the end.
    """

    def sparsity(self, step, timeline, initial, final):
        x = timeline.progress(step)
        return final + (initial - final) * (1.0 - x) ** 3


@SCHEDULES.register("linear")
class LinearSchedule(Schedule):
    """s_t = s_i + (s_f - s_i) x."""

    def sparsity(self, step, timeline, initial, final):
        return initial + (final - initial) * timeline.progress(step)


@SCHEDULES.register("one-shot", "oneshot")
class OneShotSchedule(Schedule):
    """The final sparsity at once, at `start` (then fine-tune with the masks fixed)."""

    only_at_start = True

    def sparsity(self, step, timeline, initial, final):
        return final


@SCHEDULES.register("constant")
class ConstantSchedule(Schedule):
    """Keep the zeros the model already has (e.g. fine-tuning a pruned checkpoint); prune nothing new."""

    only_at_start = True
    keeps_existing = True

    def sparsity(self, step, timeline, initial, final):
        return 0.0
