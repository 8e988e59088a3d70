"""When left-out corrected scans vouch for a change: a lower confidence bound on its gain, not a count of signs.

Leave-one-scan-out scores what a fine-tune learnt (a routed organ, an organ offset) on each corrected scan it was
not fitted on. Three positive gains are weak evidence when they spread widely: in the correction-loop benchmark
(2026-12-06) a branch whose left-out gains were +2.0, +4.0 and +12.2 Dice points lost 2.3 points on the other
patients' scans, and in the calibration design study an offset with +1.3, +2.9 and +0.4 lost 2.7. The mean gain of
a handful of scans is only as good as its spread: a change is vouched for when the one-sided lower confidence
bound of the mean left-out gain (Student's t, CONFIDENCE) is above zero, from at least the caller's minimum number
of scans, with a mean gain of at least the caller's minimum. Consistent small gains (+0.6, +1.2, +1.5) pass; wide
ones need more scans. scipy gives the t quantile; the rule itself is three lines, written here because no library
decides when a per-scan Dice gain carries over.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

CONFIDENCE = 0.95


def lower_bound(gains: Sequence[float], confidence: float = CONFIDENCE) -> Optional[float]:
    """One-sided lower confidence bound of the mean of `gains` (None for fewer than two)."""
    if len(gains) < 2:
        return None
    from scipy.stats import t

    mean, sd = statistics.fmean(gains), statistics.stdev(gains)
    return mean - float(t.ppf(confidence, len(gains) - 1)) * sd / math.sqrt(len(gains))


def spread_too_wide(gains: Sequence[float], min_scans: int) -> Optional[str]:
    """Why `gains` (at least `min_scans` of them) cannot vouch for a change because they spread too widely, or
    None when they can (or are too few for this question: the caller counts scans)."""
    if len(gains) < min_scans:
        return None
    lb = lower_bound(gains)
    if lb is None or lb > 0.0:
        return None
    return (f"the left-out gains ({', '.join(f'{g:+.1f}' for g in gains)} Dice points) spread too widely to vouch "
            f"for other scans (lower {100 * CONFIDENCE:.0f}% bound of their mean {lb:+.1f})")
