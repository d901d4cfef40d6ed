"""The send-many journal: what a journal's records say about each item on resume."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from botmsg_async import (
    ApiError,
    APIStatusError,
    AuthenticationError,
    BotMessageError,
    ClientClosedError,
    Outcome,
    RateLimitedError,
    ResponseLostError,
    SendFailedError,
    SendResult,
    ServerError,
    Status,
    TransportError,
    journal,
)

HEADER = {"botmsg_journal": journal.FORMAT_VERSION, "input": "fp", "items": 3}


def load(tmp_path: Path, *records: dict[str, Any]) -> journal.JournalState:
    path = tmp_path / "journal"
    path.write_text("".join(json.dumps(r) + "\n" for r in (HEADER, *records)), encoding="utf-8")
    return journal.load(str(path), fingerprint="fp", items=3)


def outcome(index: int, name: str, **fields: Any) -> dict[str, Any]:
    return {"i": index, "o": name, "k": "k-new", "d": "d", "u": "u", **fields}


def test_a_start_without_outcome_is_in_doubt(tmp_path: Path) -> None:
    """An item started and never finished is in doubt, with the key it was sent with."""
    state = load(tmp_path, {"i": 0, "s": "start", "key": "k0"})
    assert state.states[0] == journal.STARTED
    assert state.in_doubt == {0: ("k0", None)}


def test_a_retryable_failure_of_a_fresh_item_may_be_resent(tmp_path: Path) -> None:
    """A first send that failed retryably is RETRY: a resumed run sends it again."""
    state = load(tmp_path, {"i": 1, "s": "start", "key": "k1"}, outcome(1, "failed", retry=True))
    assert state.states[1] == journal.RETRY
    assert state.in_doubt == {}


def test_an_unsettling_resend_keeps_the_item_in_doubt(tmp_path: Path) -> None:
    """A resend of an in-doubt item that fails retryably, or is skipped, stays UNKNOWN."""
    state = load(
        tmp_path,
        {"i": 0, "s": "start", "key": "k0"},
        outcome(0, "unknown", k="k0", e="answer lost"),
        {"i": 0, "s": "start", "key": "k0"},  # --resend-unknown
        outcome(0, "failed", retry=True),
        {"i": 2, "s": "start", "key": "k2"},  # killed in flight
        outcome(2, "skipped"),  # a later run skipped it
    )
    assert state.states[0] == state.states[2] == journal.UNKNOWN
    assert state.in_doubt == {0: ("k0", "answer lost"), 2: ("k2", None)}


def test_a_settling_resend_ends_the_doubt(tmp_path: Path) -> None:
    """A resend that is SENT, or refused for good, settles the item."""
    state = load(
        tmp_path,
        {"i": 0, "s": "start", "key": "k0"},
        {"i": 0, "s": "start", "key": "k0"},
        outcome(0, "sent", m="m0"),
        {"i": 1, "s": "start", "key": "k1"},
        outcome(1, "unknown", k="k1"),
        {"i": 1, "s": "start", "key": "k1"},
        outcome(1, "failed", retry=False),
    )
    assert state.states[0] == journal.SENT
    assert state.states[1] == journal.FAILED
    assert state.in_doubt == {}
    assert state.resent == set()


def test_discard_removes_only_what_the_writer_made(tmp_path: Path) -> None:
    """discard() deletes a journal it created and empties one it found empty."""
    made = tmp_path / "made"
    writer = journal.FileJournal(str(made))
    writer.header(fingerprint="fp", items=3, window=2)
    writer.discard()
    assert not made.exists()

    found = tmp_path / "found"
    found.touch()
    writer = journal.FileJournal(str(found))
    writer.header(fingerprint="fp", items=3, window=2)
    writer.discard()
    assert found.read_bytes() == b""


def load_raw(tmp_path: Path, text: str, items: int = 10) -> journal.JournalState:
    path = tmp_path / "journal"
    path.write_text(text, encoding="utf-8")
    return journal.load(str(path), fingerprint="fp", items=items)


def lines(*records: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def header(window: int | None, items: int = 10) -> dict[str, Any]:
    record: dict[str, Any] = {"botmsg_journal": journal.FORMAT_VERSION, "input": "fp"}
    record["items"] = items
    if window is not None:
        record["window"] = window
    return record


def start(index: int) -> dict[str, Any]:
    return {"i": index, "s": "start", "key": f"k{index}"}


def test_a_torn_tail_holds_back_the_window_after_the_highest_start(tmp_path: Path) -> None:
    """After a torn record, the next `window` unstarted items are unknown, with no key."""
    text = lines(header(2), start(0), outcome(0, "sent"), start(1), start(2))
    state = load_raw(tmp_path, text + '{"i": 2, "o": "se')
    assert state.torn
    assert state.torn_in_doubt == [3, 4]
    assert state.states[5] == journal.NEW
    assert state.in_doubt[3] == (None, journal.TORN_NOTE)
    assert state.in_doubt[1] == ("k1", None)  # started: in doubt with its key, as ever


def test_without_a_torn_tail_nothing_is_held_back(tmp_path: Path) -> None:
    """A journal that ends cleanly holds back nothing: a crash loses no written record."""
    state = load_raw(tmp_path, lines(header(2), start(0), start(1)))
    assert not state.torn
    assert state.torn_in_doubt == []
    assert state.states[2] == journal.NEW


def test_an_old_journal_without_a_window_loads_with_the_default(tmp_path: Path) -> None:
    """A header without "window" (older versions) loads; a torn tail uses 64."""
    state = load_raw(tmp_path, lines(header(None, 100), start(0)) + "\0\0\0", items=100)
    assert state.torn
    assert state.torn_in_doubt == list(range(1, 1 + journal.DEFAULT_WINDOW))


def test_a_durable_run_holds_back_nothing(tmp_path: Path) -> None:
    """With window 0 (--durable: each start fsynced first), a torn tail costs no item."""
    state = load_raw(tmp_path, lines(header(0), start(0)) + '{"i"')
    assert state.torn
    assert state.torn_in_doubt == []


def test_the_window_is_the_last_runs_and_counts_only_items_it_would_send(
    tmp_path: Path,
) -> None:
    """A resumed run's window applies from its highest start, over items it would pull.

    Sent items are skipped over (the run did not pull them); an item it would
    have pulled before its highest start but has no record of is held back too.
    """
    text = lines(
        header(5),
        *(r for i in range(6) for r in (start(i), outcome(i, "sent"))),
        start(6),
        outcome(6, "failed", retry=True),  # first run: 0-5 sent, 6 to retry
        {"resume": 1, "window": 2},
        start(8),  # the resumed run: 6 pulled (record lost?), then 7 pulled, 8 started
        outcome(7, "sent"),
    )
    state = load_raw(tmp_path, text + "{")
    assert state.torn_in_doubt == [6, 9]  # 6: no record this run; 9: the window of 2 ...
    assert state.states[7] == journal.SENT  # ... counts only items not done (7 is sent)


def test_a_withdrawn_start_is_no_doubt_unless_the_item_was_in_doubt_before(
    tmp_path: Path,
) -> None:
    """skipped with attempted:false voids a fresh start; an in-doubt item stays in doubt."""
    state = load(
        tmp_path,
        {"i": 0, "s": "start", "key": "k0"},
        {"i": 0, "o": "skipped", "attempted": False},
        {"i": 1, "s": "start", "key": "k1"},
        outcome(1, "unknown", k="k1"),
        {"i": 1, "s": "start", "key": "k1"},  # --resend-unknown, --durable
        {"i": 1, "o": "skipped", "attempted": False},
    )
    assert state.states[0] == journal.SKIPPED
    assert state.states[1] == journal.UNKNOWN
    assert state.in_doubt == {1: ("k1", None)}


def test_a_held_back_item_stays_unknown_without_a_key(tmp_path: Path) -> None:
    """The keyless unknown record a resumed run writes loads as in doubt, with no key."""
    state = load(
        tmp_path, {"resume": 1, "window": 1}, {"i": 2, "o": "unknown", "e": journal.TORN_NOTE}
    )
    assert state.states[2] == journal.UNKNOWN
    assert state.in_doubt == {2: (None, journal.TORN_NOTE)}


# -- the settle rules, through the journal module alone ------------------------------------


def _failure(transient: bool) -> SendFailedError:
    result = SendResult(Status.FAILURE, errors=(ApiError("E", "x"),))
    return SendFailedError(result, transient=transient)


#: (case, outcome of this send, its error): one row per kind of answer.
SENDS: list[tuple[str, Outcome, BotMessageError | None]] = [
    ("sent", Outcome.SENT, None),
    ("final FAILURE", Outcome.FAILED, _failure(False)),
    ("transient FAILURE", Outcome.FAILED, _failure(True)),
    ("409", Outcome.FAILED, APIStatusError("x", status=409)),
    ("404", Outcome.FAILED, APIStatusError("x", status=404)),
    ("401", Outcome.FAILED, AuthenticationError("x", status=401)),
    ("429", Outcome.FAILED, RateLimitedError("x", status=429, retry_after=1.0)),
    ("no connection", Outcome.FAILED, TransportError("refused")),
    ("500", Outcome.UNKNOWN, ServerError("x", status=500)),
    ("answer lost", Outcome.UNKNOWN, ResponseLostError("lost")),
    ("skipped", Outcome.SKIPPED, None),
    ("closed before an attempt", Outcome.SKIPPED, ClientClosedError("closed")),
]

#: case -> (recorded outcome if the item was in doubt, retry_later if it was not).
EXPECTED: dict[str, tuple[Outcome, bool]] = {
    "sent": (Outcome.SENT, False),
    "final FAILURE": (Outcome.FAILED, False),
    "transient FAILURE": (Outcome.UNKNOWN, True),
    "409": (Outcome.UNKNOWN, False),
    "404": (Outcome.UNKNOWN, False),
    "401": (Outcome.UNKNOWN, True),
    "429": (Outcome.UNKNOWN, True),
    "no connection": (Outcome.UNKNOWN, True),
    "500": (Outcome.UNKNOWN, False),
    "answer lost": (Outcome.UNKNOWN, False),
    "skipped": (Outcome.UNKNOWN, False),
    "closed before an attempt": (Outcome.UNKNOWN, False),
}


@pytest.mark.parametrize(("case", "outcome", "error"), SENDS, ids=[c for c, _, _ in SENDS])
def test_settle_keeps_a_fresh_items_outcome(
    case: str, outcome: Outcome, error: BotMessageError | None
) -> None:
    """An item no earlier run may have delivered is recorded as its send came out, no note."""
    assert journal.settle(outcome, error, in_doubt=False) == (outcome, None)


@pytest.mark.parametrize(("case", "outcome", "error"), SENDS, ids=[c for c, _, _ in SENDS])
def test_settle_ends_a_doubt_only_on_proof(
    case: str, outcome: Outcome, error: BotMessageError | None
) -> None:
    """A resend of an in-doubt item settles it only when SENT or finally refused."""
    recorded, note = journal.settle(outcome, error, in_doubt=True)
    assert recorded is EXPECTED[case][0]
    # The note says why an outcome was turned into UNKNOWN, and only then.
    assert (note == journal.IN_DOUBT_NOTE) is (recorded is not outcome)


@pytest.mark.parametrize(("case", "outcome", "error"), SENDS, ids=[c for c, _, _ in SENDS])
def test_retry_later_only_for_failures_that_certainly_did_not_deliver(
    case: str, outcome: Outcome, error: BotMessageError | None
) -> None:
    """Only a FAILED item whose error proves non-delivery is sent again under a new key."""
    assert journal.retry_later(outcome, error) is EXPECTED[case][1]


@pytest.mark.parametrize("in_doubt", [False, True])
@pytest.mark.parametrize(("case", "outcome", "error"), SENDS, ids=[c for c, _, _ in SENDS])
def test_what_is_recorded_never_loads_as_fresh_when_it_may_have_been_delivered(
    tmp_path: Path, case: str, outcome: Outcome, error: BotMessageError | None, in_doubt: bool
) -> None:
    """Written with settle/retry_later and loaded back: no possibly-delivered item is resent.

    A resumed run sends items in NEW, RETRY or SKIPPED under a new key: an item
    whose send (or an earlier one) may have delivered it must load as anything else.
    """
    path = str(tmp_path / "journal")
    store: journal.JournalStore = journal.FileJournal(path)
    store.begin(fingerprint="fp", items=1, window=1, resume=False)
    if in_doubt:  # an earlier run left it in flight, and this one resends it
        store.start(0, "k0")
        store.close()
        store = journal.FileJournal(path)
        store.begin(fingerprint="fp", items=1, window=1, resume=True)
    store.start(0, "k0")
    recorded, _ = journal.settle(outcome, error, in_doubt=in_doubt)
    store.outcome(
        0,
        recorded.value,
        key="k0",
        department_uuid="d",
        user_uuid="u",
        retry=journal.retry_later(recorded, error),
    )
    store.close()
    state = journal.load(path, fingerprint="fp", items=1)
    if in_doubt or outcome is Outcome.UNKNOWN:  # it may have been delivered
        assert state.states[0] not in (journal.NEW, journal.RETRY, journal.SKIPPED)
    if state.states[0] == journal.UNKNOWN:
        assert state.in_doubt[0][0] == "k0"  # resendable only under its own key
    assert (
        state.states[0]
        == {
            Outcome.SENT: journal.SENT,
            Outcome.UNKNOWN: journal.UNKNOWN,
            Outcome.FAILED: journal.RETRY
            if journal.retry_later(recorded, error)
            else journal.FAILED,
            # After its start record, a skip proves nothing: the item stays in doubt.
            Outcome.SKIPPED: journal.UNKNOWN,
        }[recorded]
    )


# -- FileJournal -----------------------------------------------------------------------------


def test_the_file_format_is_unchanged(tmp_path: Path) -> None:
    """FileJournal writes byte for byte what earlier versions wrote (and still load)."""
    path = tmp_path / "journal"
    store = journal.FileJournal(str(path))
    assert store.begin(fingerprint="fp", items=3, window=2, resume=False) is None
    store.start(0, "k0")
    store.outcome(0, "sent", key="k0", department_uuid="d", user_uuid="u", message_uuid="m0")
    store.start(1, "k1")
    store.outcome(1, "failed", key="k1", department_uuid="d", user_uuid="u", error="E", retry=True)
    store.start(2, "k2")
    store.unattempted(2)
    store.close()
    assert path.read_bytes() == (
        b'{"botmsg_journal":1,"input":"fp","items":3,"window":2}\n'
        b'{"i":0,"s":"start","key":"k0"}\n'
        b'{"i":0,"o":"sent","m":"m0","k":"k0","d":"d","u":"u"}\n'
        b'{"i":1,"s":"start","key":"k1"}\n'
        b'{"i":1,"o":"failed","m":null,"k":"k1","d":"d","u":"u","e":"E","retry":true}\n'
        b'{"i":2,"s":"start","key":"k2"}\n'
        b'{"i":2,"o":"skipped","attempted":false}\n'
    )


def test_begin_on_resume_cuts_a_torn_tail_and_records_the_held_back(tmp_path: Path) -> None:
    """Resuming a torn journal cuts the fragment and records the held-back items as unknown."""
    path = tmp_path / "journal"
    path.write_text(lines(header(1, items=3), start(0)) + '{"i": 0, "o', encoding="utf-8")
    store = journal.FileJournal(str(path))
    state = store.begin(fingerprint="fp", items=3, window=4, resume=True)
    store.close()
    assert state is not None
    assert state.torn_in_doubt == [1]
    assert path.read_text(encoding="utf-8").endswith(
        '{"i": 0, "s": "start", "key": "k0"}\n{"resume":1,"window":4}\n'
        + json.dumps({"i": 1, "o": "unknown", "e": journal.TORN_NOTE}, separators=(",", ":"))
        + "\n"
    )
    again = journal.load(str(path), fingerprint="fp", items=3)
    assert not again.torn
    assert again.in_doubt == {0: ("k0", None), 1: (None, journal.TORN_NOTE)}


def test_begin_without_resume_refuses_a_journal_with_records(tmp_path: Path) -> None:
    """A new run never appends to a journal another run has written."""
    path = tmp_path / "journal"
    path.write_text(lines(header(1, items=3)), encoding="utf-8")
    store = journal.FileJournal(str(path))
    with pytest.raises(journal.JournalError, match="pass --resume"):
        store.begin(fingerprint="fp", items=3, window=1, resume=False)
    store.close()


def test_a_second_store_on_one_journal_is_refused(tmp_path: Path) -> None:
    """The journal is locked from the store's creation: two runs cannot share it."""
    path = str(tmp_path / "journal")
    first = journal.FileJournal(path)
    try:
        with pytest.raises(journal.JournalError, match="in use"):
            journal.FileJournal(path)
    finally:
        first.close()


def test_finished_records_of_a_store_are_its_files(tmp_path: Path) -> None:
    """FileJournal.finished_records streams the sent and failed records of its file."""
    path = tmp_path / "journal"
    path.write_text(
        lines(header(1, items=3), start(0), outcome(0, "sent", m="m0"), start(1)),
        encoding="utf-8",
    )
    store = journal.FileJournal(str(path))
    state = store.begin(fingerprint="fp", items=3, window=1, resume=True)
    assert state is not None
    assert [r["i"] for r in store.finished_records(state)] == [0]
    store.close()


# -- format version 2: the job's options ---------------------------------------------------------


def test_a_journal_begun_with_options_records_them_as_version_2(tmp_path: Path) -> None:
    """begin(options=...) writes a version 2 header that read_options and load read back."""
    path = tmp_path / "journal"
    store = journal.FileJournal(str(path), redact=lambda s: s.replace("pw", "[redacted]"))
    options = {"text": "Hi", "subject": None, "ignore_columns": ["name", "pw"]}
    assert store.begin(fingerprint="fp", items=3, window=2, resume=False, options=options) is None
    store.close()
    assert path.read_bytes() == (
        b'{"botmsg_journal":2,"input":"fp","items":3,"window":2,'
        b'"options":{"text":"Hi","subject":null,"ignore_columns":["name","[redacted]"]}}\n'
    )
    assert journal.read_options(str(path)) == {**options, "ignore_columns": ["name", "[redacted]"]}
    assert journal.load(str(path), fingerprint="fp", items=3).has_header


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ('{"botmsg_journal": 1, "input": "fp", "items": 3}\n', None),
        ('{"botmsg_journal": 2, "input": "fp", "items": 3, "options": {"t', None),  # torn
        ("\n\nnot json\n", None),
        ('{"botmsg_journal": 2, "options": {"text": "x"}}\n', {"text": "x"}),
    ],
    ids=["empty", "version-1", "torn", "garbage", "version-2"],
)
def test_read_options_finds_only_recorded_options(
    tmp_path: Path, text: str, expected: dict[str, Any] | None
) -> None:
    """Only a complete version 2 header has options; whatever else is wrong, load says."""
    path = tmp_path / "journal"
    path.write_text(text, encoding="utf-8")
    assert journal.read_options(str(path)) == expected


@pytest.mark.parametrize("options", ['"text"', "[]", "3"])
def test_options_that_are_not_an_object_are_a_journal_error(tmp_path: Path, options: str) -> None:
    """A hand-edited header with options of another shape is refused, not trusted."""
    path = tmp_path / "journal"
    path.write_text(f'{{"botmsg_journal": 2, "options": {options}}}\n', encoding="utf-8")
    with pytest.raises(journal.JournalError, match="bad options"):
        journal.read_options(str(path))


def test_read_options_of_a_missing_journal_is_a_journal_error(tmp_path: Path) -> None:
    """No journal at all: the same error as load's."""
    with pytest.raises(journal.JournalError, match="no such journal"):
        journal.read_options(str(tmp_path / "missing"))


def test_a_corrupt_journal_is_a_botmessage_error_that_pickles(tmp_path: Path) -> None:
    """Reading outside data raises only the package's errors: a corrupt journal's too."""
    path = tmp_path / "journal"
    path.write_text(json.dumps({**header(1, items=3), "botmsg_journal": 3}) + "\n")
    with pytest.raises(BotMessageError) as caught:
        journal.load(str(path), fingerprint="fp", items=3)
    assert isinstance(caught.value, journal.JournalError)
    clone = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 - our own error
    assert type(clone) is journal.JournalError
    assert str(clone) == str(caught.value)


@pytest.mark.parametrize("version", [0, 3, True, "2"])
def test_an_unknown_format_version_is_refused(tmp_path: Path, version: object) -> None:
    """Versions 1 and 2 are read; any other (True and "2" included) is no botmsg journal."""
    path = tmp_path / "journal"
    path.write_text(json.dumps({**header(1, items=3), "botmsg_journal": version}) + "\n")
    with pytest.raises(journal.JournalError, match="not a botmsg journal"):
        journal.load(str(path), fingerprint="fp", items=3)


def _begin_resumed_with_a_torn_tail(writer: journal.FileJournal) -> None:
    """``begin(resume=True)`` of a journal whose torn tail holds an item back (fsyncs)."""
    with open(writer.path, "ab") as f:
        f.write(b'{"i": 0, "s": "st')
    writer.begin(fingerprint="fp", items=3, window=1, resume=True)


#: Each FileJournal call that fsyncs: the header, a resume's held-back items, sync, close.
_FSYNCS: dict[str, Callable[[journal.FileJournal], object]] = {
    "header": lambda w: w.begin(fingerprint="fp", items=3, window=1, resume=False),
    "resumed": _begin_resumed_with_a_torn_tail,
    "sync": lambda w: asyncio.run(w.sync()),
    "close": lambda w: w.close(),
}


@pytest.mark.parametrize("call", sorted(_FSYNCS))
def test_a_failed_fsync_names_the_journal_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Every fsync of a FileJournal that fails raises an OSError naming its file."""
    path = tmp_path / "journal"
    # A new journal's begin writes the header; the others need one.
    path.write_text("" if call == "header" else json.dumps(HEADER | {"window": 1}) + "\n")
    writer = journal.FileJournal(str(path))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    try:
        with pytest.raises(OSError, match=os.strerror(errno.EIO)) as caught:
            _FSYNCS[call](writer)
    finally:
        monkeypatch.undo()
        writer.close()
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(path)
    assert str(path) in str(caught.value)


def test_a_sync_cancelled_before_its_thread_ran_leaves_no_descriptor_holding_the_lock(
    tmp_path: Path,
) -> None:
    """A cancelled sync() closes its duplicate descriptor: the journal's lock is free."""
    path = tmp_path / "journal"
    writer = journal.FileJournal(str(path))
    busy = threading.Event()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # One thread, kept busy: the sync's function is queued, not yet running.
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        blocker = loop.run_in_executor(None, busy.wait)
        task = asyncio.create_task(writer.sync())
        await asyncio.sleep(0)  # the sync is now queued behind the blocker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        busy.set()
        await blocker

    asyncio.run(main())
    writer.close()
    # No duplicate of the journal's descriptor outlives it (flock locks the open file,
    # which every duplicate shares): a new writer gets the lock.
    again = journal.FileJournal(str(path))
    again.close()


@pytest.mark.parametrize(
    "tail",
    ['{"i": 2, "o": "se', '{"i": 2, "o": "se' + "x" * 1500],
    ids=["shorter-than-the-records", "longer-than-the-records"],
)
def test_a_resume_that_cannot_write_all_its_records_leaves_the_torn_tail_holding_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail: str
) -> None:
    """A write over a torn tail cut short (a full disk) leaves the held-back items held back."""
    path = tmp_path / "journal"
    text = lines(header(2), start(0), outcome(0, "sent"), start(2)) + tail
    held = load_raw(tmp_path, text).torn_in_doubt
    assert held == [1, 3, 4]  # 1: below the highest start, no record; 3 and 4: the window
    real_write = os.write
    for budget in range(0, 1200, 7):
        path.write_text(text, encoding="utf-8")
        writer = journal.FileJournal(str(path))
        left = [budget]

        def short_write(fd: int, data: Any, left: list[int] = left) -> int:
            """As a full disk does: the bytes that fit, then ENOSPC."""
            if left[0] == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written = real_write(fd, bytes(data[: left[0]]))
            left[0] -= written
            return written

        monkeypatch.setattr(os, "write", short_write)
        try:
            # --durable: the resumed run's window is 0, so it holds back nothing itself.
            with contextlib.suppress(OSError):
                writer.begin(fingerprint="fp", items=10, window=0, resume=True)
        finally:
            monkeypatch.undo()
            writer.close()
        state = journal.load(str(path), fingerprint="fp", items=10)
        assert all(state.states[i] == journal.UNKNOWN for i in held), (budget, state.states)
        assert all(state.in_doubt[i] == (None, journal.TORN_NOTE) for i in held)
