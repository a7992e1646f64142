"""The documentation runs: every ``schane ...`` command and config path in README.md and docs/ parses and loads.

A documented config that disappears, a flag that is renamed or a ``--set`` key that no longer exists fails
here, so the docs and the code cannot drift apart silently.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from schane.cli import build_parser
from schane.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_VARS = {"$loss": "ce", "$seed": "0", "${loss}": "ce", "${seed}": "0"}


def _text(path: Path) -> str:
    # shell line continuations inside code blocks become one line
    return re.sub(r"\\\n\s*", " ", path.read_text())


def documented_commands() -> list[tuple[str, str]]:
    """``(doc name, command)`` for every ``schane ...`` command line or inline command in the docs."""
    found = []
    for doc in DOCS:
        for line in _text(doc).splitlines():
            # a command ends at a backtick or a shell separator outside quotes (';' inside --grid '...;...')
            for m in re.finditer(r"(?:^|`|\s|-m )(schane [a-z](?:'[^']*'|[^`;&|#'])*)", line):
                cmd = m.group(1).strip()
                if re.match(r"schane (train|eval|fewshot|sweep|report|analyze|compare|demo|inspect-weights|export|embed|predict|convert)\b",
                            cmd):
                    found.append((doc.name, cmd))
    return sorted(set(found))


def documented_configs() -> list[str]:
    return sorted({m for doc in DOCS for m in re.findall(r"configs/[\w/.-]+\.yaml", doc.read_text())})


def _argv(cmd: str) -> list[str]:
    for var, value in SHELL_VARS.items():
        cmd = cmd.replace(var, value)
    cmd = re.sub(r"\[--[^\]]*\]", "", cmd)  # optional parts shown as [--flag VALUE]
    cmd = cmd.replace("...", "").replace("…", "")
    return shlex.split(cmd)[1:]


def test_the_docs_show_commands_and_configs():
    assert len(documented_commands()) >= 10 and len(documented_configs()) >= 3


@pytest.mark.parametrize("path", documented_configs())
def test_every_documented_config_exists_and_loads(path):
    assert (ROOT / path).is_file(), f"{path} is documented but does not exist"
    load_config(ROOT / path)


@pytest.mark.parametrize("doc, cmd", documented_commands())
def test_every_documented_command_parses(doc, cmd):
    argv = _argv(cmd)
    if not any(a.startswith("--") for a in argv):  # a command named in prose: the command must exist
        parser = build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        name = argv[0].rstrip(":,.)")
        assert name in sub.choices, f"{doc}: `schane {name}` is not a command"
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{doc}: `{cmd}` does not parse (exit {e.code})")
    if getattr(args, "config", None) and not args.config.startswith(("FILE", "CONFIG")):
        cfg = ROOT / args.config if not Path(args.config).is_absolute() else Path(args.config)
        if cfg.is_file():  # a documented config with its documented overrides must load
            load_config(cfg, args.overrides)
    elif getattr(args, "overrides", None) and args.command == "demo":
        load_config(ROOT / "configs" / "demo.yaml", args.overrides)
    elif getattr(args, "overrides", None) and args.command in ("train", "fewshot", "compare"):
        # with --data the dataset (and so its options) comes from the folder, not from the defaults
        skip = ("name=", "data.options") if getattr(args, "data", None) else ("name=",)
        load_config(None, [o for o in args.overrides if not o.startswith(skip)])
