"""``bulk.JournalSet``: how the segments of several runs and workers combine.

The segments are written with ``FileJournal``, as workers write them; the rules
under test are the delivery rules: nothing in doubt is ever sent again under a
new key, and a later record of an item wins only where it settles something.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from botmsg_async.bulk import JournalSet
from botmsg_async.journal import NEW, RETRY, SENT, STARTED, UNKNOWN, FileJournal, JournalError

ITEMS = 6
FINGERPRINT = "input-sha"


def segment(journal: Path, run: int, worker: int) -> FileJournal:
    part = FileJournal(f"{journal}.part-{run:04d}-{worker:04d}")
    part.begin(fingerprint=FINGERPRINT, items=ITEMS, window=4, resume=False)
    return part


def outcome(part: FileJournal, index: int, outcome: str, key: str, *, retry: bool = False) -> None:
    part.outcome(index, outcome, key=key, department_uuid="d", user_uuid="u", retry=retry)


def resume(journal: Path) -> JournalSet:
    journals = JournalSet(str(journal))
    journals.begin(fingerprint=FINGERPRINT, items=ITEMS, window=4, resume=True)
    return journals


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    path = tmp_path / "journal"
    first = JournalSet(str(path))
    first.begin(fingerprint=FINGERPRINT, items=ITEMS, window=4, resume=False)
    first.close()
    return path


def test_segments_combine_by_the_delivery_rules(journal: Path) -> None:
    """Within a run a start beats no start; a later run wins unless it settles nothing."""
    dead, alive = segment(journal, 1, 1), segment(journal, 1, 0)
    # Item 0: a worker that died after a retryable failure; another sent it.
    dead.start(0, "k0-a")
    outcome(dead, 0, "failed", "k0-a", retry=True)
    alive.start(0, "k0-b")
    outcome(alive, 0, "sent", "k0-b")
    # Item 1: in flight when its worker died. Item 2: failed, may be sent again.
    dead.start(1, "k1")
    alive.start(2, "k2-a")
    outcome(alive, 2, "failed", "k2-a", retry=True)
    dead.close()
    alive.close()
    later = segment(journal, 2, 0)
    # Item 1 resent in doubt; a failure that proves nothing leaves it in doubt.
    later.start(1, "k1")
    outcome(later, 1, "failed", "k1", retry=True)
    later.start(2, "k2-b")
    outcome(later, 2, "sent", "k2-b")
    later.close()
    journals = resume(journal)
    state = journals.state
    assert state is not None
    assert list(state.states) == [SENT, UNKNOWN, SENT, NEW, NEW, NEW]
    assert state.in_doubt == {1: ("k1", None)}
    assert journals.segment(0).endswith(".part-0003-0000")
    finished = sorted((r["i"], r["k"]) for r in journals.finished_records())
    assert finished == [(0, "k0-b"), (2, "k2-b")]
    journals.close()


def test_an_unsettled_item_stays_started_with_its_key(journal: Path) -> None:
    """A start without an outcome, in any segment, is in doubt under its key."""
    part = segment(journal, 1, 0)
    part.start(3, "k3")
    part.start(4, "k4")
    outcome(part, 4, "failed", "k4", retry=True)
    part.close()
    journals = resume(journal)
    assert journals.state is not None
    assert journals.state.states[3] == STARTED
    assert journals.state.states[4] == RETRY
    assert journals.state.in_doubt == {3: ("k3", None)}
    journals.close()


def test_segments_without_resume_are_refused(journal: Path) -> None:
    """Segments of an earlier run make a new run without --resume an error."""
    segment(journal, 1, 0).close()
    journal.unlink()
    with pytest.raises(JournalError, match="--resume"):
        JournalSet(str(journal)).begin(fingerprint=FINGERPRINT, items=ITEMS, window=4, resume=False)
