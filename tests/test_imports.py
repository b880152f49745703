"""The import directions of shared/DESIGN.md: models <- families <- train <- api/CLIs.

Every `import` in every module is read (module level and inside functions alike: a lazy import
is still a dependency), so a shortcut the other way fails here, not in a later refactor.
"""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "mmjax")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str) -> set[str]:
    """The mmjax modules `path` imports, as dotted names (`from mmjax import api` -> mmjax.api)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = _module_name(path).rsplit(".", 1)[0] if not path.endswith("__init__.py") else _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "mmjax" or name.startswith("mmjax.")}


def _modules() -> dict[str, set[str]]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                out[_module_name(path)] = _imports(path)
    return out


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in _modules().items()
                  if any(_under(module, p) for p in importers)
                  for target in targets if any(_under(target, f) for f in forbidden))


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from mmjax import api\n    import mmjax.train.loop\n")
    assert {"mmjax.api", "mmjax.train.loop"} <= _imports(str(path))


def test_lower_layers_never_import_the_layers_above():
    above = ("mmjax.api", "mmjax.handles", "mmjax.train", "mmjax.evaluate", "mmjax.bench", "mmjax.export")
    assert _violations(("mmjax.models", "mmjax.sampling", "mmjax.editing", "mmjax.families", "mmjax.data",
                        "mmjax.eval", "mmjax.zoo", "mmjax.checkpoint", "mmjax.model_files", "mmjax.sharding",
                        "mmjax.config"), above) == []


def test_models_and_samplers_stand_alone():
    # Pure modules: linen models, and samplers and editors over callables and arrays.
    for own in (("mmjax.models",), ("mmjax.sampling", "mmjax.editing")):
        outside = [v for v in _violations(own, ("mmjax",)) if not any(_under(v.split(" imports ")[1], p) for p in own)]
        assert outside == [], own


def test_inference_never_imports_training():
    assert _violations(("mmjax.api", "mmjax.handles", "mmjax.model_files"), ("mmjax.train",)) == []


def test_data_checkpoints_and_sharding_know_no_families():
    assert _violations(("mmjax.data", "mmjax.checkpoint", "mmjax.sharding", "mmjax.model_files"),
                       ("mmjax.families", "mmjax.zoo", "mmjax.models")) == []


@pytest.mark.e2e
def test_sampling_the_shipped_model_imports_no_training_code():
    code = ("import sys, mmjax\n"
            "m = mmjax.load('pretrained/ldm_shapes')\n"
            "m.generate(['a red circle'], steps=2)\n"
            "bad = sorted(k for k in sys.modules if k == 'optax' or k.startswith(('optax.', 'mmjax.train')))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
