"""Hostile input files and journals for ``send-many``: a per-row failure or exit 2, never a crash.

Each case runs the real ``botmsg`` entry point in a subprocess against the fake
service on 127.0.0.1 (the helpers of ``test_cli``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from botmsg_async import journal
from botmsg_async.cli.input import BadRow, RowDefaults, parse
from botmsg_async.testing import FakeBotMessageServer

from .test_cli import botmsg, cli_env, read_jsonl, rows, write_csv, write_jsonl
from .test_cli import server as server  # the fixture, used by name

#: A JSON text nested deeper than json's C scanner can recurse (RecursionError, not ValueError).
DEEP = "[" * 100_000 + "]" * 100_000


async def test_a_deeply_nested_jsonl_row_is_an_invalid_row(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A row nested past the JSON decoder's recursion is a bad row: listed, skipped, no crash."""
    good = rows(3)
    source = tmp_path / "in.jsonl"
    lines = [json.dumps(good[0]), '{"department_uuid": "d", "user_uuid": "u", "text": ' + DEEP]
    source.write_text("\n".join([*lines, *map(json.dumps, good[1:])]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"{source}:2: not valid JSON" in run.stderr
    assert server.messages == []

    run = await botmsg("send-many", str(source), "--skip-invalid", "--out", str(out), server=server)
    assert run.rc == 0, run.stderr
    outcomes = {line["index"]: line["outcome"] for line in read_jsonl(out)}
    assert outcomes == {0: "sent", 1: "skipped", 2: "sent", 3: "sent"}
    assert len(server.messages) == 3


@pytest.mark.parametrize("where", ["first record", "a middle record"])
async def test_a_deeply_nested_journal_record_is_a_corrupt_journal(
    server: FakeBotMessageServer, tmp_path: Path, where: str
) -> None:
    """A journal record nested past the JSON decoder's recursion: exit 2, nothing sent."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal_path = tmp_path / "journal"
    assert (await botmsg("send-many", str(source), "--journal", str(journal_path), "-c", "1",
                         server=server)).rc == 0  # fmt: skip
    lines = journal_path.read_bytes().splitlines(keepends=True)
    deep = DEEP.encode() + b"\n"
    if where == "first record":
        lines[0] = b'{"botmsg_journal": 2, "options": ' + deep
    else:
        lines.insert(2, deep)
    journal_path.write_bytes(b"".join(lines))
    server.reset()
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal_path), "--resume", server=server
    )
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "the journal is corrupt" in run.stderr
    assert server.messages == []


# -- the journal's reader is total -----------------------------------------------------------

_HEADER = {"botmsg_journal": 2, "input": "fp", "items": 5, "window": 2, "options": {}}
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)
_RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "i": st.integers(-1, 6) | _ANY_JSON,
        "s": st.just("start") | _ANY_JSON,
        "key": st.text(max_size=3) | _ANY_JSON,
        "o": st.sampled_from(["sent", "failed", "unknown", "skipped"]) | _ANY_JSON,
        "retry": _ANY_JSON,
        "attempted": _ANY_JSON,
        "k": _ANY_JSON,
        "e": _ANY_JSON,
        "m": _ANY_JSON,
        "resume": _ANY_JSON,
        "window": st.integers(-1, 5) | _ANY_JSON,
    },
)
_LINES = (
    _RECORDS.map(lambda record: json.dumps(record).encode() + b"\n")
    | st.binary(max_size=12)
    | st.sampled_from([b"\n", b"\r\n", b"\xef\xbb\xbf{}\n", b"\0\0\0", DEEP.encode() + b"\n"])
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(_LINES, max_size=8))
def test_reading_any_journal_gives_a_state_or_a_journal_error(
    with_header: bool, lines: list[bytes]
) -> None:
    """Whatever bytes a journal holds, its readers return or raise JournalError, nothing else."""
    head = json.dumps(_HEADER).encode() + b"\n" if with_header else b""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "journal")
        with open(path, "wb") as f:
            f.write(head + b"".join(lines))
        try:
            journal.read_options(path)
            state = journal.load(path, fingerprint="fp", items=5)
            list(journal.finished_records(path, state))
        except journal.JournalError:
            pass


_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "botmsg_journal": st.sampled_from([1, 2]) | _ANY_JSON,
        "input": st.just("fp") | _ANY_JSON,
        "items": st.just(5) | _ANY_JSON,
        "window": st.integers(-1, 5) | _ANY_JSON,
        "options": _ANY_JSON,
    },
)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_HEADERS, st.lists(_RECORDS, max_size=4))
def test_reading_a_journal_with_any_first_record_gives_a_state_or_a_journal_error(
    header: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    """Whatever JSON the first record's fields hold (a list for a version...): JournalError."""
    lines = [json.dumps(header).encode() + b"\n"]
    lines += [json.dumps(record).encode() + b"\n" for record in records]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "journal")
        with open(path, "wb") as f:
            f.write(b"".join(lines))
        try:
            journal.read_options(path)
            state = journal.load(path, fingerprint="fp", items=5)
            list(journal.finished_records(path, state))
        except journal.JournalError:
            pass


@pytest.mark.parametrize("version", ["[1]", "{}", '"1"', "true"])
async def test_a_journal_whose_version_is_not_a_number_is_refused_without_a_traceback(
    server: FakeBotMessageServer, tmp_path: Path, version: str
) -> None:
    """A first record whose version is a list or an object: exit 2, "not a botmsg journal"."""
    source = write_csv(tmp_path / "in.csv", rows(2))
    journal_path = tmp_path / "journal"
    journal_path.write_text(f'{{"botmsg_journal": {version}, "input": "x", "items": 2}}\n')
    run = await botmsg(
        "send-many", str(source), "--journal", str(journal_path), "--resume", server=server
    )
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert "not a botmsg journal" in run.stderr
    assert server.messages == []


# -- a torn journal and --skip-invalid -------------------------------------------------------


@pytest.mark.parametrize("resumed_with", [[], ["--workers", "2"]], ids=["one-process", "workers"])
async def test_invalid_rows_take_no_place_in_a_torn_journals_window(
    server: FakeBotMessageServer, tmp_path: Path, resumed_with: list[str]
) -> None:
    """After a torn tail, the window held back is of rows the run would send, not invalid ones.

    With -c 1 the stopped run may have started one more item than its journal
    shows. Rows 2 and 3 are invalid (never sent): the next item it would have
    started is row 4, which must be held back, never resent under a new key,
    whether the resume runs in one process or with workers.
    """
    items = rows(7)
    items[2]["user_uuid"] = items[3]["user_uuid"] = "a/b"
    source = write_csv(tmp_path / "in.csv", items)
    journal_path = tmp_path / "journal"
    first = ["send-many", str(source), "--journal", str(journal_path), "-c", "1", "--skip-invalid"]
    assert (await botmsg(*first, server=server)).rc == 0
    # One at a time: header, start 0, outcome 0, start 1, outcome 1, start 4, ...
    lines = journal_path.read_bytes().splitlines(keepends=True)
    assert b'"i":1,"s":"start"' in lines[3]
    assert b'"i":1,"o":"sent"' in lines[4]
    journal_path.write_bytes(b"".join(lines[:4]) + lines[4][:15])  # torn in item 1's outcome
    server.reset()
    out = tmp_path / "out.jsonl"
    run = await botmsg(*first, "--resume", *resumed_with, "--out", str(out), server=server)
    assert run.rc == 3, run.stderr
    assert "1 item(s) the stopped run may have started" in run.stderr
    outcomes = {line["index"]: line["outcome"] for line in read_jsonl(out)}
    assert outcomes == {
        0: "sent",
        1: "unknown",
        2: "skipped",
        3: "skipped",
        4: "unknown",
        5: "sent",
        6: "sent",
    }
    assert sorted(m.user_uuid for m in server.messages) == ["user-5", "user-6"]


@pytest.mark.parametrize(
    ("never_sent", "held"),
    [(set(), [1, 2]), ({1}, [2, 3]), ({1, 2, 5}, [3, 4]), ({3}, [1, 2]), (set(range(1, 10)), [])],
)
def test_a_torn_tails_window_skips_the_items_no_run_sends(
    tmp_path: Path, never_sent: set[int], held: list[int]
) -> None:
    """load holds back the next `window` items a run would send after its highest start."""
    path = tmp_path / "journal"
    header = {"botmsg_journal": 2, "input": "fp", "items": 10, "window": 2}
    start = {"i": 0, "s": "start", "key": "k0"}
    path.write_bytes(json.dumps(header).encode() + b"\n" + json.dumps(start).encode() + b"\n{")
    state = journal.load(str(path), fingerprint="fp", items=10, never_sent=never_sent.__contains__)
    assert state.torn_in_doubt == held
    assert not never_sent & set(state.in_doubt)


# -- keys in the journal ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "\x07", "a\nb", 7, None])
async def test_a_start_record_without_a_usable_key_is_a_corrupt_journal(
    server: FakeBotMessageServer, tmp_path: Path, key: object
) -> None:
    """An in-doubt item whose start names no usable key is never resent under another: exit 2."""
    source = write_csv(tmp_path / "in.csv", rows(3))
    journal_path = tmp_path / "journal"
    args = ["send-many", str(source), "--journal", str(journal_path), "-c", "1"]
    assert (await botmsg(*args, server=server)).rc == 0
    lines = journal_path.read_bytes().splitlines(keepends=True)
    start = {"i": 1, "s": "start", "key": key}
    journal_path.write_bytes(b"".join(lines[:3]) + json.dumps(start).encode() + b"\n")
    server.reset()
    run = await botmsg(*args, "--resume", "--resend-unknown", server=server)
    assert run.rc == 2, run.stderr
    assert "start record without a key" in run.stderr
    assert server.messages == []


async def test_credentials_the_client_refuses_leave_no_new_journal(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """A user name the client refuses (a ':'): exit 2, and no journal left demanding --resume."""
    source = write_csv(tmp_path / "in.csv", rows(2))
    journal_path = tmp_path / "journal"
    args = ["send-many", str(source), "--journal", str(journal_path)]
    run = await botmsg(*args, server=server, env=cli_env(server, BOTMSG_USERNAME="cli:user"))
    assert run.rc == 2, run.stderr
    assert "must not contain ':'" in run.stderr
    assert not journal_path.exists()
    run = await botmsg(*args, server=server)
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 2


@pytest.mark.parametrize("given", ["email,phone,fax", "phone"])
async def test_resume_with_other_ignored_columns_exits_2_naming_the_flag(
    server: FakeBotMessageServer, tmp_path: Path, given: str
) -> None:
    """--ignore-columns given on --resume with another value than the journal's: exit 2."""
    items = [{**row, "email": "e", "phone": "p"} for row in rows(3)]
    source = write_csv(tmp_path / "in.csv", items)
    journal_path = tmp_path / "journal"
    args = ["send-many", str(source), "--journal", str(journal_path)]
    run = await botmsg(*args, "--ignore-columns", "email,phone", "-c", "1", server=server)
    assert run.rc == 0, run.stderr
    lines = journal_path.read_bytes().splitlines(keepends=True)
    journal_path.write_bytes(b"".join(lines[:3]))  # item 0 sent, the rest never started
    server.reset()
    run = await botmsg(*args, "--resume", "--ignore-columns", given, server=server)
    assert run.rc == 2, run.stderr
    assert "--ignore-columns differs from the journal's" in run.stderr
    assert server.messages == []
    run = await botmsg(*args, "--resume", "--ignore-columns", "phone, email", server=server)
    assert run.rc == 0, run.stderr
    assert len(server.messages) == 2


# -- a JSON line with a key twice -------------------------------------------------------------


async def test_a_jsonl_row_with_a_key_twice_is_refused_like_a_csv_column_twice(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """{"user_uuid": "a", ..., "user_uuid": "b"}: an invalid row (json would keep "b" silently)."""
    source = write_jsonl(tmp_path / "in.jsonl", rows(2))
    with source.open("a", encoding="utf-8") as f:
        f.write('{"department_uuid": "d", "user_uuid": "u-a", "text": "t", "user_uuid": "u-b"}\n')
    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 2, run.stderr
    assert f"{source}:3: key 'user_uuid' appears twice" in run.stderr
    assert server.messages == []


def _json_string(text: str, escaped: bool) -> str:
    """``text`` as a JSON string: plainly, or with every character escaped (``\\u0074``...)."""
    if escaped:
        return '"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"'
    return json.dumps(text, ensure_ascii=False)


_KEYS = st.sampled_from(["department_uuid", "user_uuid", "text", "subject", 'a"b', "é", ""])
_VALUES = st.text(max_size=3) | st.integers() | st.lists(st.text(max_size=2), max_size=2)


@settings(deadline=None, max_examples=300)
@given(st.lists(st.tuples(_KEYS, st.booleans(), _VALUES), max_size=6))
def test_a_jsonl_row_is_refused_exactly_when_a_key_repeats(
    pairs: list[tuple[str, bool, object]],
) -> None:
    """However keys are written (escaped or not), a row is refused iff one repeats."""
    members = [f"{_json_string(k, e)}: {json.dumps(v)}" for k, e, v in pairs]
    data = ("{" + ", ".join(members) + "}\n").encode()
    (parsed,) = parse(
        io.BytesIO(data), "jsonl", RowDefaults(ignore_columns=frozenset(['a"b', "é", ""]))
    )
    keys = [k for k, _, _ in pairs]
    repeated = isinstance(parsed, BadRow) and "appears twice" in parsed.problem
    assert repeated is (len(set(keys)) != len(keys))


async def test_credentials_the_client_refuses_are_a_usage_error_with_workers(
    server: FakeBotMessageServer, tmp_path: Path
) -> None:
    """--workers with a user name the client refuses: exit 2, no traceback, no journal."""
    source = write_csv(tmp_path / "in.csv", rows(2))
    journal_path = tmp_path / "journal"
    args = ["send-many", str(source), "--journal", str(journal_path), "--workers", "2"]
    run = await botmsg(*args, server=server, env=cli_env(server, BOTMSG_USERNAME="cli:user"))
    assert run.rc == 2, run.stderr
    assert "must not contain ':'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("journal")]
    assert server.messages == []


# -- a row that is not UTF-8 -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("field", ["text", "user_uuid", "subject"])
async def test_a_row_that_is_not_utf8_fails_alone_named_by_line_and_field(
    server: FakeBotMessageServer, tmp_path: Path, fmt: str, field: str
) -> None:
    """A Latin-1 byte in one row's field: that row is invalid (line, field), the others go."""
    good = [{**r, "subject": "s"} for r in rows(3)]
    bad = {**good[1], field: f"{good[1][field]}-caf\N{LATIN SMALL LETTER E WITH ACUTE}"}
    if fmt == "csv":
        header = ",".join(good[0])
        lines = [",".join(r.values()) for r in (good[0], bad, good[2])]
        source = tmp_path / "in.csv"
    else:
        lines = [json.dumps(r, ensure_ascii=False) for r in (good[0], bad, good[2])]
        source = tmp_path / "in.jsonl"
    data = ("\n".join(lines) + "\n").encode("latin-1")
    source.write_bytes((header + "\n").encode() + data if fmt == "csv" else data)
    line = 3 if fmt == "csv" else 2

    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert f"{source}:{line}: {field} holds" in run.stderr
    assert "not UTF-8" in run.stderr
    assert server.messages == []

    out = tmp_path / "out.jsonl"
    run = await botmsg("send-many", str(source), "--skip-invalid", "--out", str(out), server=server)
    assert run.rc == 0, run.stderr
    results = {r["index"]: r for r in read_jsonl(out)}
    assert {i: r["outcome"] for i, r in results.items()} == {0: "sent", 1: "skipped", 2: "sent"}
    assert results[1]["error"]["message"].startswith(f"invalid input at line {line}: {field} holds")
    assert len(server.messages) == 2


@pytest.mark.parametrize(
    ("name", "data", "said"),
    [
        ("in.csv", "department_uuid,user_uuid,text\nd,u,hi\n".encode("utf-16"), "header is"),
        ("in.jsonl", '{"department_uuid": "d"}\n'.encode("utf-16"), "in.jsonl:1: not UTF-8"),
    ],
)
async def test_an_input_that_is_not_utf8_at_all_says_so(
    server: FakeBotMessageServer, tmp_path: Path, name: str, data: bytes, said: str
) -> None:
    """A UTF-16 file: its CSV header, or a JSON line that cannot be read, is "not UTF-8 text"."""
    source = tmp_path / name
    source.write_bytes(data)
    run = await botmsg("send-many", str(source), server=server)
    assert run.rc == 2, run.stderr
    assert said in run.stderr
    assert "not UTF-8 text" in run.stderr
    assert server.messages == []
