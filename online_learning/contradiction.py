"""The contradiction check: feedback that overturns what the served model is sure of.

An event contradicts when the served model answers its text with another label at confidence
`confidence` or more. A round whose new events contradict at share `share` or more has those
events refused (marked rejected, never trained): judged on its own when it has `min_events`
events, else together with the last `window` new events (a trickle). The check exists because
rehearsal can absorb a relabelling stream well enough to pass the gate's base check, and an
accepted event is replayed in later rounds and fine-tuned on.

The share is kept low (0.2 by default) so that an attack on one intent that mixes contradictions
with agreeing events is still refused. What it does not catch, by design or by limit: a sender who
mixes in four or more agreeing events per contradiction (the served answers are public) or
relabels only texts the model is unsure of; those are left to rehearsal and the gate, and rounds
held back on the base check are deferred, which a fine-tune trains on only with
--include-deferred. How often each kind of stream contradicts, and the attack that set the share:
docs/ONLINE_LEARNING.md, "The gate".
"""

from __future__ import annotations

from collections import deque


class ContradictionCheck:
    def __init__(self, share: float, confidence: float, window: int, min_events: int):
        self.share, self.confidence, self.min_events = share, confidence, min_events
        self.recent: deque[bool] = deque(maxlen=window)

    def flags(self, model, texts: list[str], labels: list[str]) -> list[bool]:
        """Per event: the model answers another label at `confidence` or more."""
        if not texts:
            return []
        probs = model.predict(texts)
        index = {label: i for i, label in enumerate(model.labels)}
        return [bool(p.argmax() != index.get(y) and p.max() >= self.confidence) for y, p in zip(labels, probs)]

    def verdict(self, flags: list[bool]) -> str | None:
        """Record a round's flags; why its flagged events are refused, or None."""
        self.recent.extend(flags)
        if self.share >= 1 or not flags:  # 1: the check is off
            return None
        own = sum(flags) / len(flags)
        if own < self.share:  # clean events after an attack are not refused for the attack in the window
            return None
        if len(flags) >= self.min_events:
            return (f"contradicts the served model: {own:.0%} of the round's {len(flags)} events gave another "
                    f"label than its answer at >= {self.confidence} confidence")
        share = sum(self.recent) / len(self.recent)
        if len(self.recent) >= self.min_events and share >= self.share:
            return (f"contradicts the served model: {share:.0%} of the last {len(self.recent)} events gave another "
                    f"label than its answer at >= {self.confidence} confidence")
        return None
