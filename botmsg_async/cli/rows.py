"""The rows a run of ``send-many`` sends: the input read again, less what a journal settled.

One process and ``--workers`` read the input the same way: a row that became
invalid since the first pass stops the run (or is skipped, with
``--skip-invalid``), a row the journal settled is not sent again, a row in doubt
is reported unknown unless ``--resend-unknown`` (and then keeps its key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from attrs import define

from botmsg_async import Outcome, new_idempotency_key
from botmsg_async.journal import FINAL_STATES, IN_DOUBT_NOTE, IN_DOUBT_STATES, JournalState

from .common import UsageError
from .input import BadRow, Row, RowDefaults, Scan, Source, parse
from .results import Results, error_json

__all__ = ["RunInput", "count_to_send", "rows_to_send"]


@define(frozen=True)
class RunInput:
    """What a ``send-many`` run sends from, read once before any send.

    Attributes:
        source: The input file (or standard input, spooled).
        fmt: ``"csv"`` or ``"jsonl"``.
        defaults: The row options given as flags.
        scan: The first pass over the input.
        state: The journal's state when resuming it, else None.
    """

    source: Source
    fmt: str
    defaults: RowDefaults
    scan: Scan
    state: JournalState | None

    def to_send(self, *, resend_unknown: bool) -> int:
        """How many items this run will attempt (for the progress bar and the ETA)."""
        return count_to_send(self.scan, self.state, resend_unknown=resend_unknown)

    def rows(
        self,
        results: Results,
        *,
        skip_invalid: bool,
        resend_unknown: bool,
        stopped: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[Row, str, bool]]:
        """``rows_to_send`` over this input."""
        return rows_to_send(
            self.source,
            self.fmt,
            self.defaults,
            self.state,
            results,
            skip_invalid=skip_invalid,
            resend_unknown=resend_unknown,
            stopped=stopped,
            checked=self.scan.items,
        )


def count_to_send(scan: Scan, state: JournalState | None, *, resend_unknown: bool) -> int:
    """How many items this run will attempt (for the progress bar and the ETA)."""
    count = scan.valid
    if state is not None:
        count -= sum(state.count(s) for s in FINAL_STATES)
        if not resend_unknown:
            count -= len(state.in_doubt)
        else:  # but one held back after a torn tail, without its key, is never resent
            count -= sum(1 for key, _ in state.in_doubt.values() if key is None)
    return max(count, 0)


def rows_to_send(
    source: Source,
    fmt: str,
    defaults: RowDefaults,
    state: JournalState | None,
    results: Results,
    *,
    skip_invalid: bool,
    resend_unknown: bool,
    stopped: Callable[[], bool] = lambda: False,
    checked: int | None = None,
) -> Iterator[tuple[Row, str, bool]]:
    """Each row to send with its idempotency key and whether it is in doubt, read lazily.

    The rows not sent are written to ``results`` on the way: invalid ones as
    skipped, those left in doubt (without ``resend_unknown``) as unknown.

    ``checked`` is how many rows the first pass checked (and a journal counts).

    Raises:
        UsageError: a row valid in the first pass is not any more (without
            ``skip_invalid``), or there are more than ``checked`` rows: the file
            changed underneath the run.
    """
    with source.open() as f:
        for parsed in parse(f, fmt, defaults):
            if stopped():
                return
            if checked is not None and parsed.index >= checked:
                # Appended since the check: never checked, outside the journal's count.
                raise UsageError(
                    f"{source.display} changed while sending: it has more than the "
                    f"{checked} row(s) checked"
                )
            if isinstance(parsed, BadRow):
                if not skip_invalid:
                    raise UsageError(
                        f"{source.display}:{parsed.line} changed while sending: {parsed.problem}"
                    )
                results.emit(
                    parsed.index,
                    parsed.department_uuid,
                    parsed.user_uuid,
                    Outcome.SKIPPED.value,
                    error=error_json(
                        f"invalid input at line {parsed.line}: {parsed.problem}",
                        default_type="InvalidRequestError",
                    ),
                    invalid=True,
                )
                continue
            key: str | None = None
            if state is not None:
                st = state.states[parsed.index]
                if st in FINAL_STATES:
                    continue  # written to --out from the journal already
                if st in IN_DOUBT_STATES:
                    key, error = state.in_doubt[parsed.index]
                    # Without a key (held back after a torn journal) it is never resent.
                    if not resend_unknown or key is None:
                        results.emit(
                            parsed.index,
                            parsed.department_uuid,
                            parsed.user_uuid,
                            Outcome.UNKNOWN.value,
                            error=error_json(
                                error or IN_DOUBT_NOTE, default_type="DeliveryUnknownError"
                            ),
                            key=key,
                        )
                        continue
            # Items never tried, or certainly not delivered, get a fresh key; a
            # deduplicating service could answer an old key with its old failure.
            # A row's own key is the caller's choice: it is kept in every run.
            in_doubt = key is not None
            yield parsed, key or parsed.idempotency_key or new_idempotency_key(), in_doubt
