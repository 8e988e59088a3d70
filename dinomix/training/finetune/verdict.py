"""Whether the new model is better than its parent: held-out Dice before against after, and the plain verdict."""

from __future__ import annotations

from typing import Optional

HARM_DICE = -1.0         # an organ down by more than this many Dice points on the held-out cases is called out


def compare(before: Optional[dict], after: Optional[dict]) -> tuple[dict, Optional[bool], str]:
    """Per-organ before/after Dice, whether the new model is worse on average, and a plain verdict."""
    if not before or not after:
        return {}, None, ("not evaluated: the dataset has no held-out labeled cases (pass --holdout CASE ...), so "
                          "nothing says whether the new model is better or worse than its parent")
    per = {}
    for organ in before["dice"]:
        b, a = before["dice"][organ], after["dice"].get(organ)
        per[organ] = {"before": b, "after": a, "delta": None if a is None else round(a - b, 2)}
    mb, ma = before["mean_dice"], after["mean_dice"]
    worse = ma < mb
    down = organs_down(per)
    if worse:
        verdict = (f"WORSE than its parent on the held-out cases: mean Dice {ma:.1f}% vs {mb:.1f}% "
                   f"({ma - mb:+.1f}). It was registered anyway; remove it with 'dinomix models remove' if unwanted.")
    else:
        verdict = f"not worse than its parent on the held-out cases: mean Dice {ma:.1f}% vs {mb:.1f}% ({ma - mb:+.1f})."
    if down:
        verdict += " Organs down by more than 1 Dice point: " + ", ".join(down) + "."
    return per, worse, verdict


def organs_down(per: dict) -> list[str]:
    """The organs of `compare`'s per-organ table down by more than 1 Dice point, each as "organ -2.3"."""
    return [f"{o} {v['delta']:+.1f}" for o, v in per.items() if v["delta"] is not None and v["delta"] < HARM_DICE]


def harm(per: dict, organ: str) -> Optional[float]:
    """The organ's held-out Dice change when it is down by more than 1 point (it then goes back to the parent's
    output), else None."""
    delta = (per.get(organ) or {}).get("delta")
    return delta if delta is not None and delta < HARM_DICE else None


def unrouted_check(worse: Optional[bool], verdict: str) -> dict:
    """The self-check of a fine-tune without routing (`--routing off`): only the held-out cases can speak, and
    nothing kept the organs nobody corrected."""
    return {"verdict": "unsafe" if worse else ("safe" if worse is False else "unknown"),
            "message": ("Every organ was fine-tuned (--routing off): nothing keeps the organs nobody "
                        "corrected. " + verdict),
            "checks": [{"name": "held-out cases", "passed": None if worse is None else not worse,
                        "detail": verdict}], "removed": {}, "per_organ": {}}
