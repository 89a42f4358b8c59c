"""Imports flow one way, in the order of docs/design.md's layer map: config, kernels, model, optim, interop and
analysis, generation_args, checkpoint, data, training, cli. Each may import what stands above it, never what stands
below it (nor its sibling on the same line); kernels is a leaf (torch, triton and the standard library only).

The model package is pure PyTorch: importing it loads nothing of the layers below it in the map (training, data,
the Hugging Face adapter, the optimizer, the reports) and none of Lightning, Hydra, OmegaConf, datasets or wandb.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deepseek_mini"
ABOVE_THE_MODEL = ("deepseek_mini.training", "deepseek_mini.data", "deepseek_mini.interop", "deepseek_mini.optim",
                   "deepseek_mini.analysis", "deepseek_mini.checkpoint", "deepseek_mini.cli", "deepseek_mini.hf")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "datasets", "wandb")


def _loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter has loaded after `statement`."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.parametrize("statement", ["import deepseek_mini.model",
                                       "import deepseek_mini.kernels.adamw, deepseek_mini.kernels.mla_decode, "
                                       "deepseek_mini.kernels.swiglu"])
def test_model_and_kernels_load_nothing_above_them(statement):
    loaded = _loaded_after(statement)
    bad = [m for m in loaded if m.startswith(ABOVE_THE_MODEL) or m.split(".")[0] in FRAMEWORKS]
    assert not bad, bad


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}  # `from deepseek_mini import hf` names a module
    return out


def _files(package: str) -> list[Path]:
    return sorted((PACKAGE / package).glob("*.py"))


# docs/design.md's map, top to bottom; the units on one line may not import each other
LAYERS = (("config",), ("kernels",), ("model",), ("optim",), ("interop", "analysis"), ("generation_args",),
          ("checkpoint",), ("data",), ("training",), ("cli",))
# Lightning, Hydra and the rest: data (a LightningDataModule over datasets) and what stands below it only
FRAMEWORKS_FROM = "data"


def _unit(path: Path) -> str:
    """A file's unit: its subpackage (model, training, ...) or its module's name at the top (config, checkpoint)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _ours(path: Path) -> set[str]:
    """The units of deepseek_mini a file imports, other than its own."""
    return {m.split(".")[1] for m in _imports(path) if m.startswith("deepseek_mini.")} - {_unit(path)}


def test_the_layers_are_the_design_documents_map():
    """The map in docs/design.md (the first block under its layout heading) lists these units in this order, and
    every file of the package belongs to one of them (the package's __init__.py, a lazy facade, apart)."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("## Layout and import rules", 1)[1].split("```", 2)[1]
    lines = [re.split(r"\s{2,}", line.strip(), maxsplit=1)[0] for line in block.strip().splitlines()]
    units = [tuple(n.strip("/").removesuffix(".py") for n in re.split(r",\s*", names)) for names in lines]
    package_units = [u for u in units if (PACKAGE / u[0]).is_dir() or (PACKAGE / f"{u[0]}.py").is_file()]
    assert tuple(package_units) == LAYERS
    layered = {u for layer in LAYERS for u in layer}
    stray = sorted({_unit(p) for p in PACKAGE.rglob("*.py")} - layered - {"__init__"})
    assert not stray, f"not in docs/design.md's layer map: {stray}"


def test_each_unit_imports_only_what_stands_above_it():
    """Checked in the source, lazy imports inside functions included (a fresh interpreter would not see those)."""
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue
        bad = sorted(u for u in _ours(path) if rank[u] >= rank[unit] or unit == "kernels")
        frameworks = sorted(m for m in _imports(path) if m.split(".")[0] in FRAMEWORKS)
        if frameworks and rank[unit] < rank[FRAMEWORKS_FROM]:
            bad += frameworks
        if bad:
            problems.append(f"{path.relative_to(ROOT)} ({unit}) imports {bad}")
    assert not problems, "\n".join(problems)


def test_kernels_are_a_leaf():
    """torch, triton and the standard library only."""
    for path in sorted((PACKAGE / "kernels").glob("*.py")):
        third = {m.split(".")[0] for m in _imports(path)} - {"deepseek_mini", "torch", "triton", "__future__"}
        assert third <= set(sys.stdlib_module_names), f"{path.relative_to(ROOT)} imports {sorted(third)}"
        assert not _ours(path), f"{path.relative_to(ROOT)} imports {sorted(_ours(path))}"


def test_the_design_document_names_every_file():
    """docs/design.md is the map of the code: every module of the package and every script is named in it."""
    text = (ROOT / "docs" / "design.md").read_text()
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "scripts").rglob("*.sh")]
    missing = sorted(str(p.relative_to(ROOT)) for p in files
                     if p.name != "__init__.py" and not re.search(rf"(?<![\w.]){re.escape(p.name)}(?!\w)", text))
    assert not missing, f"not named in docs/design.md: {missing}"
