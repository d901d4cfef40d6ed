"""What a batch reports: an ``ItemResult`` per item, ``Counts`` by outcome, progress, the report.

Plain frozen attrs values, no I/O: the batch (``_batch``) fills them, the CLI
and the journal read them.
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeAlias, overload

import attrs
from attrs import define

from ._errors import BatchFailedError, BotMessageError
from ._models import Outcome, SendResult

__all__ = [
    "BatchReport",
    "Counts",
    "ItemResult",
    "ItemResults",
    "Progress",
    "ResultRow",
    "Tally",
]


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


#: ``SendResult``'s fields (its columns) and the constructor's names for them.
_RESULT_FIELDS = tuple(field.name for field in attrs.fields(SendResult) if field.init)
_RESULT_ARGS = tuple(field.alias or field.name for field in attrs.fields(SendResult) if field.init)
_result_values = operator.attrgetter(*_RESULT_FIELDS)
_NO_RESULT = (None,) * len(_RESULT_FIELDS)

#: An ``ItemResult``'s fields as a tuple, in order: what a batch hands a report,
#: so that no ``ItemResult`` is built for an item nobody reads one of.
ResultRow: TypeAlias = tuple[int, str, str, Outcome, SendResult | None, BotMessageError | None]


class ItemResults(Sequence[ItemResult]):
    """A batch's ``ItemResult``s in input order, stored as columns; each built when read.

    A list of ``ItemResult``s holds two objects per item that the garbage
    collector must visit on every full collection (the result and its
    ``SendResult``): about 12 µs per message of a large ``keep="all"`` batch,
    and ~300 bytes each. Here an item is a few entries in flat columns (its
    ids, outcome and its answer's fields) that add no container object per
    item, so the collector has next to nothing to walk. Errors, rare, are kept
    as they are. Reading gives equal ``ItemResult``s (not the same objects).

    Args:
        items: ``ItemResult``s to start with, in any order.
    """

    __slots__ = (
        "_department",
        "_errors",
        "_in_order",
        "_index",
        "_order",
        "_outcome",
        "_user",
        "_values",
    )

    def __init__(self, items: Iterable[ItemResult] = ()) -> None:
        self._index = array("q")
        self._department: list[str] = []
        self._user: list[str] = []
        self._outcome: list[Outcome] = []
        # The SendResult fields of every item, flat; a row of None: no result.
        self._values: list[Any] = []
        self._errors: dict[int, BotMessageError] = {}
        self._order: array[int] | None = None
        self._in_order = True  # added in input order so far: no sorting needed
        for item in items:
            self.append(item)

    def append(self, item: ItemResult) -> None:
        """Add ``item`` (in any order: reads are in input order)."""
        row = (item.index, item.department_uuid, item.user_uuid, item.outcome)
        self.add((*row, item.result, item.error))

    def add(self, row: ResultRow) -> None:
        """Add the item whose ``ItemResult`` fields ``row`` holds, without building one."""
        index, department_uuid, user_uuid, outcome, result, error = row
        position = len(self._outcome)
        if position and index < self._index[-1]:
            self._in_order = False
        self._index.append(index)
        self._department.append(department_uuid)
        self._user.append(user_uuid)
        self._outcome.append(outcome)
        self._values.extend(_NO_RESULT if result is None else _result_values(result))
        if error is not None:
            self._errors[position] = error
        self._order = None  # out of date if it was worked out

    def sort(self) -> None:
        """Put the items in input order (by ``index``), once all are in; reads do it if needed."""
        if not self._in_order and self._order is None:
            self._order = self._input_order()

    def _input_order(self) -> array[int]:
        index = self._index
        return array("q", sorted(range(len(index)), key=index.__getitem__))

    def _build(self, position: int) -> ItemResult:
        if not self._in_order:
            if self._order is None:
                self._order = self._input_order()
            position = self._order[position]
        width = len(_RESULT_FIELDS)
        values = self._values[position * width : (position + 1) * width]
        result = (
            None
            if values[0] is None  # a SendResult always has a status
            else SendResult(**dict(zip(_RESULT_ARGS, values, strict=True)))
        )
        return ItemResult(
            self._index[position],
            self._department[position],
            self._user[position],
            self._outcome[position],
            result=result,
            error=self._errors.get(position),
        )

    def __len__(self) -> int:
        return len(self._outcome)

    @overload
    def __getitem__(self, i: int) -> ItemResult: ...

    @overload
    def __getitem__(self, i: slice) -> list[ItemResult]: ...

    def __getitem__(self, i: int | slice) -> ItemResult | list[ItemResult]:
        if isinstance(i, slice):
            return [self._build(p) for p in range(len(self))[i]]
        return self._build(range(len(self))[i])  # negative indices, IndexError as a list

    def __iter__(self) -> Iterator[ItemResult]:
        return (self._build(p) for p in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemResults | list):  # as a list: never equal to a tuple
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return repr(list(self))


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
        results: ``ItemResult``s in input order (as many as ``keep`` kept): a
            read-only sequence, stored compactly (``ItemResults``).
        counts: Items by outcome (``sent``, ``failed``, ``unknown``, ``skipped``
            are also attributes of the report).
        retries: HTTP retries made across the batch.
        elapsed: Seconds the batch took.
        stopped_by: The error that stopped the batch early, or None.
    """

    results: Sequence[ItemResult]
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
