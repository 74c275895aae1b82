"""Every command shown in README.md and docs/*.md is checked against the code, so the docs cannot go stale.

A shown command is a line starting with ``$ `` inside a code block, or a line of a ```bash block.

- ``orchestrator train | verify | scale | estimate | submit | search`` (or ``python -m orchestrator ...``):
  each run the command would make is composed and converted to the typed schema with the project's own
  ``compose`` / ``to_config`` (every point of a ``-m`` sweep or a search; for ``verify`` and ``scale`` each strategy
  they name), less the run-only overrides (``hydra.run.dir=``, ``hydra.sweep.dir=``) and ``cluster=NAME``
  (whose ``conf/cluster/NAME.yaml`` must exist). A wrong key, group, option or job name fails here.
  Where the docs show the command's ``error:`` line, a command the config layer refuses must be refused
  with that error (``...`` in the shown line stands for any text); one that composes fails later, in a
  check that needs files or a machine the docs only describe, and is not run.
- Other subcommands (``export``, ``report``, ``submit``, ``jobs``, ``cluster``): ``orchestrator <subcommand>
  [action] --help`` is run once each, and every flag the docs use must appear in it.
- ``make TARGET``: the target must exist in the Makefile (``make run ARGS=...`` composes its ARGS too).

Nothing is run that needs a network, a GPU, a cluster or a user's directory. A block the test cannot
compose for a good reason is marked in the doc, on the line before the block, with
``<!-- docs-test: skip (reason) -->``. Paths under the repository's own folders that the docs mention
must exist, and links between the docs must resolve, anchors included.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from orchestrator.cli import main
from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import Config
from orchestrator.errors import UserError
from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
FENCE = re.compile(r"^\s*```\s*(\S*)")
COMPOSED = {"train", "verify", "scale", "estimate", "submit", "search"}
RUN_ONLY = ("hydra.run.", "hydra.sweep.")  # where a run's files go: nothing to compose
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p"}  # Hydra flags that take the next argument
CHECKED_DIRS = ("tests", "jobs", "conf", "bench", "cluster", "docs", "examples", "orchestrator")
# A repository path in the text: not the tail of a longer path or a URL (`~/.config/orchestrator/...`).
REPO_PATH = re.compile(rf"(?<![\w./~-])((?:{'|'.join(CHECKED_DIRS)})/[\w./-]*)")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.\w+)?$")  # NAME, ID, NAME.yaml: the user's to fill in
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Shown:
    """One command as a doc shows it."""

    doc: str
    line: int
    text: str
    error: str | None = None  # the `error: ...` line shown under it, without the prefix
    skip: str | None = None  # the reason of a `docs-test: skip` mark on its block

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _blocks(path: Path) -> list[tuple[int, str, list[str], str | None]]:
    """The fenced code blocks of ``path``: (line of the first content line, language, lines, skip reason)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = SKIP_MARK.search(before)
        end = next(j for j in range(i + 1, len(lines)) if FENCE.match(lines[j]))
        blocks.append((i + 2, opening.group(1), lines[i + 1 : end], mark.group(1).strip() if mark else None))
        i = end + 1
    return blocks


def _complete(text: str) -> bool:
    """Whether ``text`` is a whole shell command (no open quote, no trailing backslash)."""
    if text.rstrip().endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return False
    return True


def shown_commands(path: Path) -> list[Shown]:
    """Every command ``path`` shows, with the error line shown under it, if any."""
    doc = str(path.relative_to(REPO))
    found = []
    for first, language, lines, skip in _blocks(path):
        prompt = any(line.startswith("$ ") for line in lines)
        i = 0
        while i < len(lines):
            line, number = lines[i], first + i
            i += 1
            if prompt:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif language != "bash" or not line.strip() or line.lstrip().startswith("#"):
                continue
            while not _complete(line) and i < len(lines):
                line, i = line + "\n" + lines[i], i + 1
            error = None
            if prompt and i < len(lines) and lines[i].startswith("error: "):
                error = lines[i].removeprefix("error: ")
            found.append(Shown(doc, number, line, error=error, skip=skip))
    return found


SHOWN = [shown for path in DOCS for shown in shown_commands(path)]


def _commands(shown: Shown) -> list[list[str]]:
    """The simple commands of a shown line (a pipeline or list is split), leading VAR=value dropped."""
    words = shlex.split(shown.text.replace("\\\n", " "), comments=True)
    commands, current = [], []
    for word in [*words, ";"]:
        if word in ("|", "||", "&&", ";"):
            if current:
                commands.append(current)
            current = []
        elif current or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word):
            current.append(word)
    return commands


def _orchestrator_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``orchestrator`` (or ``python -m orchestrator``), None for another program."""
    if Path(argv[0]).name == "orchestrator":
        return argv[1:]
    if Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "orchestrator"]:
        return argv[3:]
    return None


def _points(overrides: list[str]) -> list[list[str]]:
    """What the CLI checks of a ``-m`` sweep or search: every dimension at its first value, then each other
    value one dimension at a time (the low end of an interval, which the sampler reaches)."""
    dimensions = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            dimensions.append([override.input_line])
            continue
        value = override.value()
        values = [value.start] if isinstance(value, IntervalSweep) else list(override.sweep_string_iterator())
        dimensions.append([f"{override.get_key_element()}={v}" for v in values])
    base = [values[0] for values in dimensions]
    return [base] + [base[:i] + [value] + base[i + 1 :] for i, values in enumerate(dimensions) for value in values[1:]]


def _check_cluster(name: str) -> None:
    if not PLACEHOLDER.match(name):
        assert (REPO / "conf" / "cluster" / f"{name}.yaml").is_file(), f"cluster={name}: no conf/cluster/{name}.yaml"


def _compose_runs(command: str, args: list[str], *, error: str | None) -> None:
    """Composes every run ``orchestrator COMMAND ARGS`` would make; checks a shown error against the schema's."""
    overrides, multirun, skip_next = [], False, False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_VALUE_FLAGS:
            skip_next = True
        elif arg.startswith("-"):
            continue  # --cfg's value aside, flags do not change the config (--help, --follow, --json)
        elif arg.startswith("cluster=") and command in ("submit", "scale", "search"):
            _check_cluster(arg.partition("=")[2])
        elif not arg.startswith(RUN_ONLY):
            overrides.append(arg)
    for point in _points(overrides) if multirun or command == "search" else [overrides]:
        config, refused = _composed(tuple(point))
        if refused is not None:
            assert error is not None, f"{point} does not compose: {refused}"
            position = 0
            for piece in [piece.strip() for piece in error.split("...") if piece.strip()]:
                found = refused.find(piece, position)  # the shown error, `...` standing for any text
                assert found >= 0, f"shown: error: {error}\nactual: error: {refused}"
                position = found + len(piece)
            continue
        strategies = {"verify": config.verify.strategies, "scale": config.scale.strategies}.get(command, [])
        for strategy in strategies:
            _, refused = _composed((*point, f"strategy={strategy}"))
            assert refused is None, f"{command} of {point} under strategy={strategy} does not compose: {refused}"


@cache
def _composed(point: tuple[str, ...]) -> tuple[Config | None, str | None]:
    """``to_config(compose(point))``, or the one line the config layer refuses it with (composed once)."""
    try:
        return to_config(compose(list(point))), None
    except UserError as exc:
        return None, str(exc)


@cache
def _makefile_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def _check_make(argv: list[str]) -> None:
    for word in argv[1:]:
        name, equals, value = word.partition("=")
        if equals and name == "ARGS":
            _compose_runs("train", shlex.split(value), error=None)
        elif not equals and not word.startswith("-"):
            assert word in _makefile_targets(), f"make {word}: no such target in the Makefile"


def _help_key(args: list[str]) -> tuple[str, ...]:
    """The (sub)command whose --help lists the flags: ``jobs logs``, ``cluster up``, ``export``, ..."""
    if args[0] in ("cluster", "jobs") and len(args) > 1 and not args[1].startswith("-"):
        return (args[0], args[1])
    return (args[0],)


@cache
def _help(key: tuple[str, ...]) -> str:
    """What ``orchestrator KEY --help`` prints, run once per (sub)command through the CLI's own ``main``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main([*key, "--help"])
        except SystemExit as exc:  # argparse's --help
            status = exc.code
    assert status == 0, f"orchestrator {' '.join(key)} --help exited {status}"
    return out.getvalue()


def _check_flags(args: list[str]) -> None:
    key = _help_key(args)
    text = _help(key)
    for arg in args[len(key) :]:
        if arg.startswith("-") and arg not in ("-h", "--help"):
            flag = arg.partition("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"orchestrator {' '.join(key)}: {flag} is not in its --help"
            )


def check(shown: Shown) -> None:
    """Checks one shown command (each command of a pipeline or list)."""
    if "RAY_AUTH_TOKEN_PATH=" in shown.text:  # Ray's CLI reads the token file only with token auth on
        assert "RAY_AUTH_MODE=token" in shown.text, "RAY_AUTH_TOKEN_PATH without RAY_AUTH_MODE=token"
    for argv in _commands(shown):
        args = _orchestrator_args(argv)
        if args is not None:
            assert args, "orchestrator without a command"
            if args[0] in COMPOSED:
                _compose_runs(args[0], args[1:], error=shown.error)
            if args[0] not in COMPOSED - {"submit"}:
                _check_flags(args)
        elif argv[0] == "make":
            _check_make(argv)


@pytest.mark.parametrize("shown", [s for s in SHOWN if not s.skip], ids=lambda s: f"{s.doc}:{s.line}")
def test_every_shown_command_composes_or_matches_the_cli(shown: Shown) -> None:
    check(shown)


def test_the_docs_show_commands_of_every_kind() -> None:
    """The extraction itself works: a doc change that hid every command from this test would fail here."""
    argvs = [argv for shown in SHOWN if not shown.skip for argv in _commands(shown)]
    programs = {(_orchestrator_args(argv) or [argv[0]])[0] for argv in argvs}
    assert {
        "train",
        "verify",
        "scale",
        "estimate",
        "search",
        "submit",
        "export",
        "report",
        "cluster",
        "jobs",
        "make",
    } <= programs
    assert any(shown.error for shown in SHOWN), "no shown error line was found"
    assert all(shown.skip for shown in SHOWN if shown.skip is not None), "a docs-test: skip mark without a reason"


def test_paths_the_docs_mention_exist() -> None:
    missing = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for mention in REPO_PATH.findall(line):
                mention = mention.rstrip(".,")
                if any(PLACEHOLDER.match(part) for part in mention.split("/")):
                    continue
                if not (REPO / mention).exists():
                    missing.append(f"{path.relative_to(REPO)}:{number}: {mention}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"^#{1,6}\s+(.*)", line)):
            anchors.add(_slug(heading.group(1)))
    return anchors


def test_links_between_the_docs_resolve() -> None:
    broken = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target):
                    continue  # https:, mailto:
                file, _, anchor = target.partition("#")
                linked = (path.parent / file).resolve() if file else path
                if not linked.exists():
                    broken.append(f"{path.relative_to(REPO)}:{number}: {target}")
                elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                    broken.append(f"{path.relative_to(REPO)}:{number}: {target} (no such heading)")
    assert not broken, "links that do not resolve:\n" + "\n".join(broken)


def _table_row(text: str, first_cell: str) -> str:
    row = next((line for line in text.splitlines() if line.startswith(f"| {first_cell} |")), None)
    assert row is not None, f"no table row for {first_cell}"
    return row


def test_the_configuration_page_lists_every_option_default_and_job() -> None:
    """The config-group table names every option of each group with conf/config.yaml's default marked,
    and the jobs table names every job in jobs/."""
    text = (REPO / "docs" / "configuration.md").read_text()
    defaults = dict(re.findall(r"^  - (\w+): (\w+)$", (REPO / "conf" / "config.yaml").read_text(), re.MULTILINE))
    for group in sorted(p for p in (REPO / "conf").iterdir() if p.is_dir() and p.name != "job"):
        row = _table_row(text, f"`{group.name}`")
        options = sorted(p.stem for p in group.glob("*.yaml"))
        for option in options:
            assert f"`{option}`" in row, f"{group.name}={option} is missing from the config-group table"
        if group.name in defaults and len(options) > 1:
            assert f"`{defaults[group.name]}` (default)" in row, f"{group.name}: the default is {defaults[group.name]}"
    for job in sorted(p.stem for p in (REPO / "jobs").glob("*.yaml")):
        _table_row(text, f"`{job}`")
