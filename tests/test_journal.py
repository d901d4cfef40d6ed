"""The send-many journal: what a journal's records say about each item on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from botmsg_async import _journal

HEADER = {"botmsg_journal": _journal.FORMAT_VERSION, "input": "fp", "items": 3}


def load(tmp_path: Path, *records: dict[str, Any]) -> _journal.JournalState:
    path = tmp_path / "journal"
    path.write_text("".join(json.dumps(r) + "\n" for r in (HEADER, *records)), encoding="utf-8")
    return _journal.load(str(path), fingerprint="fp", items=3)


def outcome(index: int, name: str, **fields: Any) -> dict[str, Any]:
    return {"i": index, "o": name, "k": "k-new", "d": "d", "u": "u", **fields}


def test_a_start_without_outcome_is_in_doubt(tmp_path: Path) -> None:
    """An item started and never finished is in doubt, with the key it was sent with."""
    state = load(tmp_path, {"i": 0, "s": "start", "key": "k0"})
    assert state.states[0] == _journal.STARTED
    assert state.in_doubt == {0: ("k0", None)}


def test_a_retryable_failure_of_a_fresh_item_may_be_resent(tmp_path: Path) -> None:
    """A first send that failed retryably is RETRY: a resumed run sends it again."""
    state = load(tmp_path, {"i": 1, "s": "start", "key": "k1"}, outcome(1, "failed", retry=True))
    assert state.states[1] == _journal.RETRY
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
    assert state.states[0] == state.states[2] == _journal.UNKNOWN
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
    assert state.states[0] == _journal.SENT
    assert state.states[1] == _journal.FAILED
    assert state.in_doubt == {}
    assert state.resent == set()


def test_discard_removes_only_what_the_writer_made(tmp_path: Path) -> None:
    """discard() deletes a journal it created and empties one it found empty."""
    made = tmp_path / "made"
    writer = _journal.JournalWriter(str(made))
    writer.header(fingerprint="fp", items=3, window=2)
    writer.discard()
    assert not made.exists()

    found = tmp_path / "found"
    found.touch()
    writer = _journal.JournalWriter(str(found))
    writer.header(fingerprint="fp", items=3, window=2)
    writer.discard()
    assert found.read_bytes() == b""
