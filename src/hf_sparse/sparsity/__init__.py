from .patterns import PATTERNS, Pattern, get_pattern
from .schedules import SCHEDULES, Schedule, Timeline
from .targets import find_targets


__all__ = ["PATTERNS", "SCHEDULES", "Pattern", "Schedule", "Timeline", "find_targets", "get_pattern"]
