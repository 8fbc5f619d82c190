"""The dunning schedule: when a failed invoice payment is tried again, and when Tally gives up.

Pure arithmetic on times. Attempt 1 is the first charge (the push's); each retry is one more
attempt, at a fixed offset from the first failure (default 3, 5 and 7 days after it). After
the last retry fails, the invoice is uncollectible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

DAY = 86_400
DEFAULT_RETRY_SECONDS = (3 * DAY, 5 * DAY, 7 * DAY)
MAX_RETRIES = 20


@dataclass(frozen=True, slots=True)
class DunningSchedule:
    """Retries at these offsets after the first failed attempt, increasing, each more than zero."""

    offsets: tuple[timedelta, ...]

    @classmethod
    def of_seconds(cls, seconds: Sequence[int]) -> DunningSchedule:
        """ValueError unless 1 to MAX_RETRIES offsets, each positive and later than the one before."""
        if not 1 <= len(seconds) <= MAX_RETRIES:
            raise ValueError(f"a dunning schedule has 1 to {MAX_RETRIES} retries")
        if any(s <= 0 for s in seconds) or any(b <= a for a, b in itertools.pairwise(seconds)):
            raise ValueError("dunning retries must be more than zero and each later than the one before")
        return cls(tuple(timedelta(seconds=s) for s in seconds))

    @property
    def attempts(self) -> int:
        """Attempts in all: the first charge and every retry."""
        return 1 + len(self.offsets)

    def next_attempt(self, first_failure: datetime, failed_attempts: int) -> datetime | None:
        """When to try again after `failed_attempts` failures (>= 1); None: that was the last."""
        retries_done = failed_attempts - 1
        if retries_done >= len(self.offsets):
            return None
        return first_failure + self.offsets[max(retries_done, 0)]


DEFAULT_SCHEDULE = DunningSchedule.of_seconds(DEFAULT_RETRY_SECONDS)
