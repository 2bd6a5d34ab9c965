"""Every third-party package the code imports is declared in pyproject.toml (core or an extra).

Imports inside functions count: the walk reads every ``import`` statement of every module, so a lazy
import of a package that only arrived as someone else's dependency (matplotlib, scikit-learn) fails here.
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bidirlm_pl", "moe", "callbacks")
# Import names of optional packages that may be absent here (CUDA-only extras), with their distribution.
NOT_INSTALLABLE_HERE = {"flash_attn": "flash-attn", "flash_attn_interface": "flash-attn-4"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {normalise(re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0]) for spec in specs}


def imported_top_levels() -> dict[str, str]:
    """Top-level module name -> first file importing it (absolute imports only)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    dists = packages_distributions()
    ours = {"bidirlm_pl", *PACKAGES}
    wanted = declared()
    missing = []
    for module, where in sorted(imported_top_levels().items()):
        if module in ours or module in sys.stdlib_module_names or module == "__future__":
            continue
        candidates = dists.get(module) or [NOT_INSTALLABLE_HERE.get(module, module)]
        if not any(normalise(d) in wanted for d in candidates):
            missing.append(f"{module} ({where}; distribution {candidates})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_walk_sees_lazy_imports():
    modules = imported_top_levels()
    assert "matplotlib" in modules and "sklearn" in modules  # both imported inside functions
