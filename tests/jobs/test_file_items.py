"""``FileItems``: a job's rows read from the input file a chunk at a time, from offsets."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from botmsg_async import SendRequest
from botmsg_async.cli.input import BadRow, RowDefaults, Source, parse
from botmsg_async.cli.jobs import FileItems

_CSV = (
    "\ufeff\n"
    "department_uuid,user_uuid,text,idempotency_key\n"
    "d1,u0,hello,\n"
    "\n"
    'd1,u1,"two\nlines, quoted",k1\n'
    ",u2,no department,\n"
    "d2,u3,[starts like an array,\n"
    "d2,u4,repeats a key,k1\n"
    ",,,\n"
    'd3,u5,"a ""quote""",\n'
    "d3,u6,last,k6\n"
)
_JSONL = (
    "\ufeff" + '{"department_uuid": "d1", "user_uuid": "u0", "text": "hello"}\n'
    "\n"
    '{"department_uuid": "d1", "user_uuid": "u1", "text": "x", "idempotency_key": "k1"}\n'
    '["an array row"]\n'
    "not json\n"
    '{"department_uuid": "d2", "user_uuid": "u4", "text": "y", "idempotency_key": "k1"}\n'
    '{"department_uuid": "d3", "user_uuid": "u5", "text": "z"}\n'
)


def _all_at_once(source: Source, fmt: str) -> list[SendRequest | None]:
    """The rows as one pass over the whole file reads them (invalid ones None)."""
    with source.open() as f:
        return [
            None
            if isinstance(row, BadRow)
            else SendRequest(
                row.department_uuid, row.user_uuid, row.message, idempotency_key=row.idempotency_key
            )
            for row in parse(f, fmt, RowDefaults(None, None, None))
        ]


@pytest.mark.parametrize(("fmt", "text"), [("csv", _CSV), ("jsonl", _JSONL)])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 100])
def test_chunks_read_from_offsets_equal_one_pass(
    tmp_path: Path, fmt: str, text: str, chunk: int
) -> None:
    """Rows read a chunk at a time from their offsets, in order or not, equal one pass's."""
    path = tmp_path / f"in.{fmt}"
    path.write_text(text, encoding="utf-8")
    with contextlib.ExitStack() as stack:
        source = Source(str(path), stack)
        expected = _all_at_once(source, fmt)
        assert any(r is None for r in expected)
        assert any(r is not None for r in expected)
        items = FileItems(source, fmt, RowDefaults(None, None, None), chunk, stack)
        assert len(items) == len(expected)
        assert list(items) == expected
        backwards = [items[i] for i in reversed(range(len(items)))]
        assert backwards == expected[::-1]
        assert items[-1] == expected[-1]
        assert items[1:3] == expected[1:3]
        with pytest.raises(IndexError):
            items[len(expected)]
