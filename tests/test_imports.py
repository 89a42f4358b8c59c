"""Imports flow one way: config -> model -> kernels / optim -> data -> training -> entry points.

The model package is pure PyTorch: importing it loads nothing of the layers above it (training, data, the
Hugging Face adapter, the optimizer, the reports) and none of Lightning, Hydra, OmegaConf, datasets or wandb.
The kernels package is a leaf that the model and the optimizer both call.
"""

from __future__ import annotations

import ast
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


@pytest.mark.parametrize(("package", "may_import"), [
    ("model", ("deepseek_mini.config", "deepseek_mini.model", "deepseek_mini.kernels")),
    ("kernels", ("deepseek_mini.kernels",)),
    ("optim", ("deepseek_mini.config", "deepseek_mini.model", "deepseek_mini.kernels", "deepseek_mini.optim")),
])
def test_packages_import_only_below_them(package, may_import):
    """Checked in the source, lazy imports inside functions included (a fresh interpreter would not see those)."""
    assert _files(package)
    for path in _files(package):
        ours = {m for m in _imports(path) if m.split(".")[0] == "deepseek_mini" and m != "deepseek_mini"}
        bad = sorted(m for m in ours if not m.startswith(may_import))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
        frameworks = sorted(m for m in _imports(path) if m.split(".")[0] in FRAMEWORKS)
        assert not frameworks, f"{path.relative_to(ROOT)} imports {frameworks}"
    if package == "kernels":  # a leaf: torch, triton and the standard library only
        for path in _files(package):
            third = {m.split(".")[0] for m in _imports(path)} - {"deepseek_mini", "torch", "triton", "__future__"}
            assert third <= set(sys.stdlib_module_names), f"{path.relative_to(ROOT)} imports {sorted(third)}"
