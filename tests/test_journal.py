"""The send-many journal: what a journal's records say about each item on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from botmsg_async import journal

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
