"""bench/repro.py's verdicts: the papers' claims decided over seeds by one stated rule.

Every claim is a paired difference per seed, signed so that a negative value bears it out
(e.g. the MoM arm's val loss minus the vanilla arm's, both trained with that seed). RULE
below is printed beside the table.
"""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

HOLDS, FAILS, UNDECIDED = "HOLDS", "DOES NOT HOLD", "INCONCLUSIVE"
MIN_SEEDS = 2  # one seed has no spread: it cannot tell a gap from noise
RULE = (f"A claim HOLDS (or DOES NOT HOLD) when every seed's paired difference has the same "
        f"sign, or when the mean difference exceeds twice the standard deviation of the "
        f"differences; it is {UNDECIDED} otherwise, and always with fewer than {MIN_SEEDS} "
        f"seeds. A claim with a side condition that is not met (e.g. fewer FLOPs) DOES NOT "
        f"HOLD whatever the losses.")
QUALITY_TOLERANCE = 0.01  # "keeps quality" / "matches": val loss at most 1% worse


def verdict(differences: Sequence[float]) -> str:
    """The rule on one claim's per-seed differences (negative: borne out)."""
    if len(differences) < MIN_SEEDS:
        return UNDECIDED
    if all(d < 0 for d in differences):
        return HOLDS
    if all(d > 0 for d in differences):
        return FAILS
    mean = statistics.fmean(differences)
    if abs(mean) > 2 * statistics.stdev(differences):
        return HOLDS if mean < 0 else FAILS
    return UNDECIDED


def combined(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made at several points (e.g. compression ratios): decided
    only where every point agrees."""
    return verdicts[0] if len(set(verdicts)) == 1 else UNDECIDED


def relative(a: float, b: float) -> float:
    return a / b - 1


def describe(differences: Sequence[float], unit: str = "", percent: bool = False) -> str:
    """'mean -0.0123 (seeds -0.01, -0.02, -0.006)', in % when `percent`."""
    scale, fmt = (100, "{:+.2f}%") if percent else (1, "{:+.4f}" + unit)
    per_seed = ", ".join(fmt.format(scale * d) for d in differences)
    mean = fmt.format(scale * statistics.fmean(differences)) if differences else "n/a"
    return f"mean {mean} (seeds {per_seed})"


def line(text: str, differences: Sequence[float], evidence: str,
         condition: Optional[tuple[bool, str]] = None) -> str:
    """'<claim>: VERDICT at this scale (<evidence>).' `condition`: (met, what) for a claim
    that also needs something the seeds do not vary (e.g. fewer FLOPs per token)."""
    word = verdict(differences)
    if condition is not None:
        met, what = condition
        evidence = f"{evidence}; {what}: {'yes' if met else 'NO'}"
        if not met:
            word = FAILS
    return f"{text}: {word} at this scale ({evidence})."


def loss_gap(per_seed: dict, a: str, b: str) -> list[float]:
    """Per seed that trained both, arm a's val loss relative to arm b's (negative: a is
    better)."""
    return [relative(per_seed[s][a], per_seed[s][b]) for s in sorted(per_seed)
            if a in per_seed[s] and b in per_seed[s]]
