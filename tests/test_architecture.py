"""The layering of docs/architecture.md holds: no module imports itself through others (imports inside
functions count), and the import-linter contracts of pyproject.toml are kept."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop(); on_stack.discard(member); group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_no_module_imports_itself_through_other_modules():
    graph = grimp.build_graph("bidirlm_pl")
    assert "bidirlm_pl.moe.stages" in graph.modules and "bidirlm_pl.callbacks.preemption" in graph.modules
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.a")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter (the dev extra) is not installed")
def test_import_contracts_are_kept():
    exe = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in run.stdout


@pytest.mark.parametrize("layout", [
    {"Schedule": "bidirlm_pl.stages.base", "LoraSpec": "bidirlm_pl.backbone", "BackboneSpec": "bidirlm_pl.backbone"},
    {"Schedule": "bidirlm_pl.specs", "LoraSpec": "bidirlm_pl.specs", "BackboneSpec": "bidirlm_pl.specs"},
])
def test_checkpoints_written_before_the_specs_moved_still_load_safely(tmp_path, monkeypatch, layout):
    """The specs lived in stages.base and backbone, then in bidirlm_pl.specs: old checkpoints name them there."""
    import types

    import torch

    from bidirlm_pl.core import specs
    from bidirlm_pl.core.checkpoint_io import safe_torch_load

    for name, old in layout.items():
        cls = getattr(specs, name)
        monkeypatch.setattr(cls, "__module__", old)  # pickled under the old module name
        module = sys.modules.get(old) or types.ModuleType(old)
        monkeypatch.setitem(sys.modules, old, module)
        monkeypatch.setattr(module, name, cls, raising=False)
    saved = {"schedule": specs.Schedule(name="wsd"), "backbone": specs.BackboneSpec(model="m", lora=specs.LoraSpec(r=4))}
    torch.save(saved, tmp_path / "old.ckpt")
    monkeypatch.undo()
    loaded = safe_torch_load(tmp_path / "old.ckpt")
    assert loaded == saved and type(loaded["schedule"]) is specs.Schedule
    assert type(loaded["backbone"].lora) is specs.LoraSpec


def test_every_module_imports_first_in_a_fresh_process():
    """A package ``__init__`` that re-exports an upper layer hides cycles from the layer contract: importing each
    module first (with no other project module loaded) shows them."""
    graph = grimp.build_graph("bidirlm_pl")
    modules = sorted(m for m in graph.modules if not m.endswith(".__main__"))
    script = (
        "import importlib, sys\n"
        f"failed = []\nfor name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'bidirlm_pl' or m.startswith('bidirlm_pl.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except ImportError as err:\n        failed.append(f'{name}: {err}')\n"
        "print('\\n'.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ""
