"""Version numbers for the learner's publishes: never reused after a crash, never one another
publisher (a fine-tune, a plain retrain, another learner's snapshot) can hold.

Numbers are reserved in the model store a block at a time (one small write per block), and after
each reservation the store is listed: a claim made before the reservation landed shows there and
is jumped over; a claim made after it goes above the reservation (train/store.py's module doc has
the argument). A reservation is a write to the store, so only the owner of the state_dir makes one,
under a name that carries its ownership epoch (`online-learner-e<epoch>`): a superseded learner's
late write cannot lower its successor's reservation, and the successor removes the older ones its
own covers.
"""

from __future__ import annotations

__all__ = ["RESERVE_BLOCK", "VersionNumbers"]

RESERVE_BLOCK = 100  # version numbers reserved in the store at a time


class VersionNumbers:
    """The learner's numbering. `floor`: no number at or below it may be used again (the state
    file keeps it durable; the caller writes it before any replica hears of a number)."""

    def __init__(self, store, owner, floor: int = 0, reserver: str = "online-learner"):
        self.store, self.owner, self.reserver = store, owner, reserver
        self.floor = floor
        self._reserved_up_to = 0  # numbers up to this are reserved for us in the store
        self._taken_up_to = 0  # ...except those up to this, claimed by others before we reserved

    def lineage_first(self, *seen: int) -> int:
        """A lineage's first number: above every number seen (the floor, the store's prefixes and
        reservations, and `seen`: replicas' reports, the version served now), and free."""
        self.floor = self.free(max(self.floor, self.store.highest_number(), self.store.reserved(), *seen) + 1)
        return self.floor

    def after(self, version: int) -> int:
        """The next free number above both `version` (the one served now) and the floor."""
        return self.free(max(version, self.floor) + 1)

    def used(self, version: int) -> None:
        """`version` is published (its state written): never hand it or anything below out again."""
        self.floor = max(self.floor, version)

    def _drop_older(self, mine: str) -> None:
        """Remove the reservations of lower epochs (and of learners before epochs) that ours
        covers. Never a higher epoch's: a superseded learner running this must not remove its
        successor's. A failure leaves them, which only keeps a few more numbers unused."""
        def epoch_of(name: str) -> int | None:
            if name == self.reserver:
                return 0
            head, sep, epoch = name.rpartition("-e")
            return int(epoch) if sep and head == self.reserver and epoch.isdigit() else None

        try:
            for name, up_to in self.store.reservations().items():
                epoch = epoch_of(name)
                if name != mine and epoch is not None and epoch < self.owner.epoch and up_to <= self._reserved_up_to:
                    self.store.unreserve(name)
        except OSError:
            pass

    def free(self, candidate: int) -> int:
        """`candidate` or the first number above it that no other publisher can hold."""
        while True:
            if candidate > self._reserved_up_to:
                self.owner.check()  # a superseded learner reserves nothing
                mine = f"{self.reserver}-e{self.owner.epoch}"
                self.store.reserve(mine, candidate + RESERVE_BLOCK)
                self._reserved_up_to = candidate + RESERVE_BLOCK  # only once the reservation is stored
                self._taken_up_to = self.store.highest_number()
                self._drop_older(mine)
            if candidate > self._taken_up_to:
                return candidate
            candidate = self._taken_up_to + 1
