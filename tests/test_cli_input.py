"""``botmsg_async.cli.input``: parsing and checking send-many rows, without a process."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from botmsg_async import InvalidRequestError, SendRequest, TextMessage, check_request, journal
from botmsg_async.cli import input as input_module
from botmsg_async.cli.common import UsageError
from botmsg_async.cli.console import Console
from botmsg_async.cli.input import BadRow, Row, RowDefaults, Source, parse, scan_input
from botmsg_async.cli.results import Results
from botmsg_async.cli.rows import count_to_send, rows_to_send


def parse_jsonl(*rows: dict[str, Any], defaults: RowDefaults | None = None) -> list[Row | BadRow]:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return list(parse(io.BytesIO(data), "jsonl", defaults or RowDefaults()))


def row(**fields: Any) -> dict[str, Any]:
    return {"department_uuid": "d-1", "user_uuid": "u-1", "text": "hi", **fields}


#: (case, row, the problem reported): the first problem of each row, as the pre-scan words it.
BAD_ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("missing id", row(user_uuid=""), "user_uuid is missing"),
    ("id not a string", row(department_uuid=7), "department_uuid must be a string, not int"),
    ("slash", row(user_uuid="a/b"), "user_uuid 'a/b': must not contain '/'"),
    ("dot-dot", row(department_uuid=".."), "department_uuid '..': must not be a path segment"),
    # check_request looks at the ids before the message: the department is reported.
    ("both ids bad", row(department_uuid="a?b", user_uuid="c#d"), "department_uuid 'a?b'"),
    ("bad id, no text", row(user_uuid="%", text=""), "user_uuid '%': must not contain '%'"),
    ("no text", row(text="  "), "no text: fill the text column or pass --text"),
    ("text missing", {"department_uuid": "d", "user_uuid": "u"}, "no text: fill the text"),
    ("subject not a string", row(subject=["x"]), "subject must be a string, not list"),
    ("surrogate", row(sender_name="\ud800"), "sender_name holds a lone surrogate (U+D800"),
]


@pytest.mark.parametrize(("case", "values", "problem"), BAD_ROWS, ids=[c for c, _, _ in BAD_ROWS])
def test_a_bad_row_names_its_first_problem(case: str, values: dict[str, Any], problem: str) -> None:
    """Each bad row is one BadRow at its line, its first problem worded for a file."""
    (parsed,) = parse_jsonl(values)
    assert isinstance(parsed, BadRow)
    assert parsed.line == 1
    assert parsed.problem.startswith(problem), parsed.problem


def test_message_flags_apply_to_every_row() -> None:
    """--text and --subject replace each row's own value; a blank row value is left out."""
    parsed = parse_jsonl(
        row(text="", subject=""), row(subject="own"), defaults=RowDefaults(text="T", subject="S")
    )
    assert [p.message for p in parsed if isinstance(p, Row)] == [
        TextMessage("T", subject="S"),
        TextMessage("T", subject="S"),
    ]


ids = st.text(st.characters(codec="utf-8"), max_size=8)


@settings(deadline=None, max_examples=300)
@given(ids, ids, st.text(st.characters(codec="utf-8"), max_size=8))
def test_the_pre_scan_passes_exactly_what_the_client_accepts(
    department: str, user: str, text: str
) -> None:
    """A row is valid exactly when check_request accepts its request (ids stripped)."""
    (parsed,) = parse_jsonl(row(department_uuid=department, user_uuid=user, text=text))
    request = SendRequest(department.strip(), user.strip(), TextMessage(text))
    try:
        check_request(request)
    except InvalidRequestError:
        accepted = False
    else:
        accepted = True
    assert isinstance(parsed, Row) is accepted


_ID_PARTS = st.sampled_from(["a", "Z", "0", "-", ".", "_", " ", "/", "%", "é", "\ud800", ""])


@settings(deadline=None, max_examples=500)
@given(
    st.lists(_ID_PARTS, max_size=4).map("".join),
    st.lists(_ID_PARTS, max_size=4).map("".join),
    st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from([" ", "\t\n", "x" * 5]),
)
def test_the_usual_row_is_built_as_the_checks_build_it(
    department: str, user: str, text: str
) -> None:
    """Whenever the usual-row path takes a row, it builds what every check would."""
    from botmsg_async.cli import input as input_

    values = {"department_uuid": department, "user_uuid": user, "text": text}
    fast = input_._plain_row(3, 5, values)
    if fast is not None:
        assert fast == input_._checked_row(3, 5, values, RowDefaults())


def test_the_usual_row_path_takes_a_uuid_row() -> None:
    """A row of two UUIDs and an ASCII text takes the short path (the benchmark's rows)."""
    from botmsg_async.cli import input as input_

    values = {
        "department_uuid": " 5b0e8a4c-2f6d-4c1a-9e3b-7d8f0a1b2c3d",
        "user_uuid": "00000000-0000-4000-8000-000000000001",
        "text": "Your parcel has arrived.",
    }
    fast = input_._plain_row(0, 2, values)
    assert fast is not None
    assert fast == input_._checked_row(0, 2, values, RowDefaults())


def test_consoles_share_no_secrets() -> None:
    """Each run's Console redacts its own credentials: no state lives in the module."""
    first, second = Console(), Console()
    first.redact.add_credentials("user", "hunter2-pw")
    assert first.printable("pw hunter2-pw") == "pw [redacted]"
    assert second.printable("pw hunter2-pw") == "pw hunter2-pw"


#: Every state an item of a journal can be in, NEW to SKIPPED.
_STATES = st.integers(journal.NEW, journal.SKIPPED)


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.tuples(_STATES, st.none() | st.just("k")), min_size=1, max_size=6),
    st.booleans(),
)
def test_the_count_to_send_is_what_the_rows_to_send_yield(
    items: list[tuple[int, str | None]], resend_unknown: bool
) -> None:
    """The progress bar's total and the ETA count exactly the rows a run sends (none held back)."""
    state = journal.JournalState(len(items))
    for index, (item_state, key) in enumerate(items):
        state.states[index] = item_state
        if item_state in journal.IN_DOUBT_STATES:
            # A key of None: held back after a torn tail, never resent.
            state.in_doubt[index] = (None if key is None else f"{key}-{index}", None)
    data = "".join(json.dumps(row(user_uuid=f"u-{i}")) + "\n" for i in range(len(items)))
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        path = os.path.join(directory, "in.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write(data)
        source = Source(path, stack)
        scan = scan_input(source, "jsonl", RowDefaults())
        sent = rows_to_send(
            source,
            "jsonl",
            RowDefaults(),
            state,
            Results(Console(), None),
            skip_invalid=False,
            resend_unknown=resend_unknown,
        )
        assert count_to_send(scan, state, resend_unknown=resend_unknown) == len(list(sent))


@pytest.mark.parametrize("ending", [b"\n", b""])
def test_a_line_over_the_limit_is_a_bad_row_read_in_bounded_pieces(
    monkeypatch: pytest.MonkeyPatch, ending: bytes
) -> None:
    """A JSON line over the limit is a bad row named by its line, never read whole; next rows go."""
    monkeypatch.setattr(input_module, "_MAX_LINE_BYTES", 100)
    long = json.dumps(row(text="x" * 1000)).encode()
    last = json.dumps(row(user_uuid="u-2")).encode()
    data = json.dumps(row()).encode() + b"\n" + long + b"\n" + last + ending

    class Reader(io.BytesIO):
        longest = 0

        def readline(self, size: int | None = -1) -> bytes:
            line = super().readline(size)
            Reader.longest = max(Reader.longest, len(line))
            return line

    digest = hashlib.sha256()
    parsed = list(parse(Reader(data), "jsonl", RowDefaults(), digest))
    assert [type(p) for p in parsed] == [Row, BadRow, Row]
    assert parsed[1] == BadRow(1, 2, "over 100 bytes: not read")
    assert Reader.longest <= 100
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()  # every byte fingerprinted
    csv_data = b"department_uuid,user_uuid,text\nd,u," + b"x" * 1000 + b"\nd,u,hi\n"
    with pytest.raises(UsageError, match="line 2: over 100 bytes"):
        list(parse(Reader(csv_data), "csv", RowDefaults()))
