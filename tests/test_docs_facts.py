"""What the docs quote from the code is what the code does: commands, names, codes, errors.

``tests/test_docs.py`` runs the docs' Python examples; this module checks the rest of what
a reader copies: every ``botmsg ...`` command line (in shell blocks and in prose), every
``botmsg_async.x.y`` name, the keyword arguments of calls quoted in prose, the exit-code
table, and the error tree of docs/errors.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import botmsg_async
from botmsg_async.cli import common
from botmsg_async.cli.parser import build_parser
from botmsg_async.journal import FORMAT_VERSION, FileJournal
from tests.test_docs import DOCS, PAGES, ROOT, fences

SHELL = {"bash", "console"}
#: The modules whose public names prose may quote without their module.
PUBLIC_MODULES = [
    "botmsg_async",
    "botmsg_async.testing",
    "botmsg_async.journal",
    "botmsg_async.bulk",
    "botmsg_async.otel",
    "botmsg_async.shared",
    "botmsg_async.jobs",
]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT).as_posix()}:{line}"


def shell_commands() -> Iterator[tuple[str, str]]:
    """Each ``botmsg ...`` command of the docs' shell blocks: (page:line, command)."""
    for page in PAGES:
        for line, lang, code, _ in fences(page):
            if lang not in SHELL:
                continue
            for n, text in enumerate(code.replace("\\\n", " ").splitlines()):
                for part in re.split(r"&&|\|\||;|\|", text.strip().removeprefix("$ ")):
                    if part.strip().startswith("botmsg "):
                        yield _where(page, line + n), part.strip()


def prose_commands() -> Iterator[tuple[str, str]]:
    """Each ``botmsg ...`` in inline code: (page:line, command); often a fragment."""
    for page in PAGES:
        for n, text in enumerate(page.read_text("utf-8").splitlines(), 1):
            for match in re.finditer(r"`(botmsg [^`]*)`", text):
                yield _where(page, n), match[1]


def unknown_options(command: str) -> list[str]:
    """The options of ``command`` that its (sub)command does not have."""
    parser = build_parser()
    unknown = []
    for token in shlex.split(command, comments=True)[1:]:
        subcommands = _subcommands(parser)
        if token in subcommands:
            parser = subcommands[token]
        elif token.startswith("-") and token != "-":
            name = token.split("=", 1)[0]
            if name not in _options(parser):
                unknown.append(name)
    return unknown


SHELL_COMMANDS = list(shell_commands())
PROSE_COMMANDS = list(prose_commands())


def test_the_docs_quote_commands() -> None:
    """The extractors find commands: a broken one must not pass as 'nothing to check'."""
    assert len(SHELL_COMMANDS) >= 5
    assert len(PROSE_COMMANDS) >= 10


@pytest.mark.parametrize(("where", "command"), SHELL_COMMANDS, ids=[w for w, _ in SHELL_COMMANDS])
def test_shell_command_parses(where: str, command: str) -> None:
    """A whole ``botmsg`` command line of a shell block is accepted by the parser as is."""
    try:
        build_parser().parse_args(shlex.split(command, comments=True)[1:])
    except SystemExit as stop:  # argparse reports a bad command line by exiting 2
        pytest.fail(f"{where}: {command!r} exits {stop.code}")


@pytest.mark.parametrize(("where", "command"), PROSE_COMMANDS, ids=[w for w, _ in PROSE_COMMANDS])
def test_prose_command_options_exist(where: str, command: str) -> None:
    """Every option of a ``botmsg ...`` quoted in prose is an option of that subcommand."""
    assert unknown_options(command) == [], f"{where}: {command!r}"


def test_unknown_options_finds_a_misspelt_flag() -> None:
    """The prose check would catch a wrong flag (it is not vacuous)."""
    assert unknown_options("botmsg send-many x.csv --journall j --rate 5") == ["--journall"]
    assert unknown_options("botmsg job status --redis URL --job NAME --watch") == []


def test_exit_code_table_matches_the_code() -> None:
    """docs/cli.md's exit-code table, the --help epilog and the EXIT_* constants agree."""
    text = (DOCS / "cli.md").read_text("utf-8")
    table = {int(code) for code in re.findall(r"^\| (\d+) \|", text, flags=re.MULTILINE)}
    constants = {
        common.EXIT_OK,
        common.EXIT_FAILED,
        common.EXIT_USAGE,
        common.EXIT_UNKNOWN,
        common.EXIT_INTERRUPTED,
    }
    epilog = build_parser().epilog or ""
    in_help = {int(code) for code in re.findall(r"^\s+(\d+)\s", epilog, flags=re.MULTILINE)}
    assert table == constants == in_help


def _public(name: str) -> object:
    """The object a dotted ``botmsg_async...`` name denotes (ImportError/AttributeError if none)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(name)


def test_dotted_names_resolve() -> None:
    """Every ``botmsg_async.x.y`` quoted in the docs exists."""
    missing = []
    for page in PAGES:
        text = page.read_text("utf-8")
        for name in set(re.findall(r"\bbotmsg_async(?:\.\w+)+", text)):
            try:
                _public(name.removesuffix(".py"))
            except (ImportError, AttributeError):
                missing.append(f"{page.name}: {name}")
    assert missing == []


def _callables() -> dict[str, list[Callable[..., object]]]:
    """Public callables by name, and the methods of the public classes by name."""
    found: dict[str, list[Callable[..., object]]] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                found.setdefault(name, []).append(obj)
            if inspect.isclass(obj):
                for method_name, method in vars(obj).items():
                    if not method_name.startswith("_") and callable(method):
                        found.setdefault(f".{method_name}", []).append(method)
    return found


def _bad_keywords(call: str, targets: list[Callable[..., object]]) -> list[str]:
    """The keywords of ``call`` that no one of ``targets`` takes ([] if one takes them all)."""
    keywords = re.findall(r"(?<![\w.])(\w+)=", call)
    first_bad: list[str] = []
    for target in targets:
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):  # no signature to check against
            return []
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return []
        bad = [k for k in keywords if k not in parameters]
        if not bad:
            return []
        first_bad = first_bad or bad
    return first_bad


def test_keywords_quoted_in_prose_are_parameters() -> None:
    """``Name(keyword=...)`` in the docs' prose uses parameters that ``Name`` has."""
    callables = _callables()
    wrong = []
    for page in PAGES:
        for n, line in enumerate(page.read_text("utf-8").splitlines(), 1):
            for code in re.findall(r"`([^`]+)`", line):
                for match in re.finditer(r"(\.)?(\w+)\(([^()]*)\)", code):
                    dot, name, args = match.groups()
                    targets = callables.get(f".{name}" if dot else name, [])
                    if targets and (bad := _bad_keywords(args, targets)):
                        wrong.append(f"{_where(page, n)}: {match[0]!r}: {bad}")
    assert wrong == []


def _error_tree() -> list[tuple[int, str]]:
    """The tree of docs/errors.md as (depth, class name), in order."""
    text = (DOCS / "errors.md").read_text("utf-8")
    (block,) = [code for _, lang, code, _ in fences(DOCS / "errors.md") if lang == "text"]
    assert block.startswith("BotMessageError"), text
    nodes = [(0, "BotMessageError")]
    for line in block.splitlines()[1:]:
        match = re.match(r"^([│ ]*)[├└]── (\w+)", line)
        if match:
            nodes.append((len(match[1]) // 4 + 1, match[2]))
    return nodes


def test_the_error_tree_lists_every_public_error_under_a_base_of_it() -> None:
    """docs/errors.md's tree has every public error once, each under one of its bases."""
    nodes = _error_tree()
    parents: dict[str, str] = {}
    stack: list[str] = []
    for depth, name in nodes:
        del stack[depth:]
        if stack:
            parents[name] = stack[-1]
        stack.append(name)
    public = {
        name
        for name in botmsg_async.__all__
        if isinstance(obj := getattr(botmsg_async, name), type)
        and issubclass(obj, botmsg_async.BotMessageError)
    }
    assert sorted(name for _, name in nodes) == sorted(public)
    for name, parent in parents.items():
        assert issubclass(getattr(botmsg_async, name), getattr(botmsg_async, parent)), name


def test_the_journal_header_documented_is_the_one_written(tmp_path: Path) -> None:
    """docs/bulk.md's journal header has the version and fields ``botmsg send-many`` writes."""
    (documented,) = [
        json.loads(code) for _, lang, code, _ in fences(DOCS / "bulk.md") if lang == "json"
    ]
    path = tmp_path / "job.journal"
    journal = FileJournal(str(path))
    journal.begin(fingerprint="f", items=1, window=64, resume=False, options=documented["options"])
    journal.close()
    written = json.loads(path.read_text("utf-8").splitlines()[0])
    assert documented["botmsg_journal"] == written["botmsg_journal"] == FORMAT_VERSION
    assert documented.keys() == written.keys()


def test_an_explicit_members_list_in_the_api_reference_names_every_public_name() -> None:
    """An ``automodule`` with ``:members:`` listed documents the whole of its ``__all__``."""
    text = (DOCS / "api.md").read_text("utf-8")
    listed = re.findall(
        r"^\.\. automodule:: (\S+)\n   :members: ((?:.*\n      )*.*)$", text, flags=re.MULTILINE
    )
    assert listed, "docs/api.md lists no members: the pattern is out of date"
    for module_name, members in listed:
        names = {name.strip() for name in members.split(",")}
        assert names == set(importlib.import_module(module_name).__all__), module_name
