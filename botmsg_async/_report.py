"""What a batch reports: an ``ItemResult`` per item, ``Counts`` by outcome, progress, the report.

Plain frozen attrs values, no I/O: the batch (``_batch``) fills them, the CLI
and the journal read them.
"""

from __future__ import annotations

from attrs import define

from ._errors import BatchFailedError, BotMessageError
from ._models import Outcome, SendResult

__all__ = ["BatchReport", "Counts", "ItemResult", "Progress", "Tally"]


@define(frozen=True)
class ItemResult:
    """The outcome of one item of a batch.

    Attributes:
        index: Position of the item in the input (0-based).
        department_uuid: The item's department.
        user_uuid: The item's user.
        outcome: SENT, FAILED, UNKNOWN or SKIPPED.
        result: The service's answer when SENT.
        error: Why it was not SENT (None when SENT or SKIPPED without cause).
    """

    index: int
    department_uuid: str
    user_uuid: str
    outcome: Outcome
    result: SendResult | None = None
    error: BotMessageError | None = None

    @property
    def attempts(self) -> int:
        """HTTP attempts spent on this item."""
        if self.result is not None:
            return self.result.attempts
        return self.error.attempts if self.error is not None else 0


@define(frozen=True)
class Counts:
    """How many items ended each way: the one tally behind ``Progress``, reports and the CLI.

    Attributes:
        sent: Items the service accepted.
        failed: Items not delivered.
        unknown: Items that may or may not have been delivered.
        skipped: Items never attempted.
    """

    sent: int = 0
    failed: int = 0
    unknown: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        """Items with an outcome."""
        return self.sent + self.failed + self.unknown + self.skipped

    @property
    def attempted(self) -> int:
        """Items that were sent, failed or ended unknown (not skipped)."""
        return self.sent + self.failed + self.unknown


class Tally:
    """The running counts of one batch; ``counts()`` takes a frozen snapshot."""

    __slots__ = ("failed", "retries", "sent", "skipped", "unknown")

    def __init__(self) -> None:
        self.sent = self.failed = self.unknown = self.skipped = self.retries = 0

    def counts(self) -> Counts:
        return Counts(self.sent, self.failed, self.unknown, self.skipped)


class _ByOutcome:
    """``sent``, ``failed``, ``unknown`` and ``skipped``, read from the ``counts`` of a snapshot."""

    counts: Counts

    @property
    def sent(self) -> int:
        """Items the service accepted."""
        return self.counts.sent

    @property
    def failed(self) -> int:
        """Items not delivered."""
        return self.counts.failed

    @property
    def unknown(self) -> int:
        """Items that may or may not have been delivered."""
        return self.counts.unknown

    @property
    def skipped(self) -> int:
        """Items never attempted."""
        return self.counts.skipped


@define(frozen=True)
class Progress(_ByOutcome):
    """A snapshot of a running batch, for progress bars and logs.

    Attributes:
        counts: Completed items, by outcome.
        in_flight: Items being sent now.
        retries: HTTP retries made so far.
        elapsed: Seconds since the batch began.
    """

    counts: Counts
    in_flight: int
    retries: int
    elapsed: float

    @property
    def done(self) -> int:
        """Items with a final outcome."""
        return self.counts.total

    @property
    def rate(self) -> float:
        """Completed sends per second so far."""
        return self.counts.attempted / self.elapsed if self.elapsed > 0 else 0.0


@define(frozen=True)
class BatchReport(_ByOutcome):
    """What became of every item of a ``send_many``.

    Attributes:
        results: ``ItemResult``s in input order (as many as ``keep`` kept).
        counts: Items by outcome (``sent``, ``failed``, ``unknown``, ``skipped``
            are also attributes of the report).
        retries: HTTP retries made across the batch.
        elapsed: Seconds the batch took.
        stopped_by: The error that stopped the batch early, or None.
    """

    results: list[ItemResult]
    counts: Counts
    retries: int
    elapsed: float
    stopped_by: BotMessageError | None = None

    @property
    def total(self) -> int:
        """Items in the input."""
        return self.counts.total

    @property
    def messages_per_second(self) -> float:
        """Items sent, failed or unknown per second of the batch."""
        return self.counts.attempted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        """Whether every item was sent."""
        return self.sent == self.total

    def raise_for_failures(self) -> None:
        """Raise ``BatchFailedError`` unless every item was sent.

        Raises:
            BatchFailedError: some items failed, are unknown or were skipped;
                chained to ``stopped_by`` when the batch stopped early.
        """
        if not self.ok:
            raise BatchFailedError(
                failed=self.failed, unknown=self.unknown, skipped=self.skipped
            ) from self.stopped_by
