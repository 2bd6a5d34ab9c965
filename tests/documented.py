"""What the README, docs/ and the configs' comments tell users to run: config paths and `bidirlm` commands."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.yaml"))


def texts() -> dict[Path, str]:
    """Every document a user reads: README, docs pages, and the comments of shipped configs."""
    found = {path: path.read_text() for path in DOCS}
    for path in CONFIG_FILES:
        found[path] = "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
    return found


def config_paths(text: str) -> set[str]:
    """Every ``configs/...`` file named (a trailing ``*`` or ``...`` names a folder pattern, kept as is)."""
    return set(re.findall(r"(?<![\w/.-])configs/[\w./*-]*[\w*]", text))


def _joined(text: str) -> str:
    """Shell lines continued with a trailing backslash joined into one (comment markers dropped)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


def fit_compositions(text: str) -> list[tuple[str, ...]]:
    """The ``--config`` files, in order, of every documented ``bidirlm fit|validate`` command with two or more."""
    runs = []
    for match in re.finditer(r"(?:bidirlm|bidirlm_pl\.cli) (?:fit|validate)\b([^\n`|]*)", _joined(text)):
        configs = tuple(re.findall(r"--config[ =](configs/[\w./-]+\.yaml)", match.group(1)))
        if len(configs) >= 2:
            runs.append(configs)
    return runs


def bidirlm_commands(text: str) -> set[str]:
    """The subcommand of every ``bidirlm SUBCOMMAND`` written in code (backticks or indented blocks)."""
    code = "\n".join(re.findall(r"`([^`\n]+)`", text)) + "\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(("    ", "#   ", "# ")))
    return set(re.findall(r"(?<![\w/.-])bidirlm ([a-z][a-z-]*)\b", code))
