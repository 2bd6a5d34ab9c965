"""README is the front door (<= 300 lines) and every page it points to exists; every ``configs/...`` path and
``bidirlm`` command named in README, docs/ or a config's comments exists."""

import re

from documented import DOCS, ROOT, bidirlm_commands, config_paths, texts

from bidirlm_pl.cli.main import LIGHTNING_SUBCOMMANDS, TOOLS


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 300
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme))
    pages = {str(p.relative_to(ROOT)) for p in DOCS if p.parent.name == "docs"}
    assert pages and pages <= linked, sorted(pages - linked)
    assert all((ROOT / page).is_file() for page in linked), sorted(linked)


def test_every_config_path_named_in_the_docs_exists():
    missing = sorted({(str(where.relative_to(ROOT)), path) for where, text in texts().items()
                      for path in config_paths(text) if not list(ROOT.glob(path))})
    assert not missing, missing


def test_every_bidirlm_command_named_in_the_docs_exists():
    known = set(LIGHTNING_SUBCOMMANDS) | set(TOOLS)
    named = {(str(where.relative_to(ROOT)), command) for where, text in texts().items()
             for command in bidirlm_commands(text)}
    assert {command for _, command in named} >= {"fit", "run", "merge", "compare", "export"}
    assert not sorted(item for item in named if item[1] not in known)


def test_the_finders_find_what_they_should():
    text = "run `bidirlm fit --config configs/mntp/gpu.yaml --config configs/mntp/x.yaml`; bidirlm nope"
    assert config_paths(text) == {"configs/mntp/gpu.yaml", "configs/mntp/x.yaml"}
    assert bidirlm_commands(text) == {"fit"}
