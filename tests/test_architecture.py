"""The layers show themselves: the engine and the alert logic import without Lightning or TensorBoard."""

import sys

import pytest
from side_by_side import BACKGROUND

CODE = """
import sys
for name in ("lightning", "pytorch_lightning", "tensorboard", "matplotlib"):
    sys.modules[name] = None  # any import of these now fails
import torch
import lightning_gradprobe
from lightning_gradprobe import probe, jacobians, saliency, ProbeReport, GradientCheckError
from lightning_gradprobe.alerts import evaluate_alerts, figures_from_report, AlertThresholds
report = probe(torch.nn.Linear(3, 2), torch.randn(4, 3))
assert report.ok and evaluate_alerts(figures_from_report(report), AlertThresholds(), step=0) == []
print("ok")
"""


LAUNCH_TIMEOUT = 120


def launch(root):
    """A fresh process, where Lightning, TensorBoard and matplotlib cannot be imported."""
    return {"core": ["-c", CODE]}


@pytest.mark.slow
@pytest.mark.launched
def test_core_and_alerts_need_neither_lightning_nor_tensorboard():
    assert BACKGROUND.launches(__name__).succeeded("core").stdout.strip() == "ok"


def test_public_surface_is_declared():
    import lightning_gradprobe

    assert set(lightning_gradprobe.__all__) == {
        "Culprit",
        "CulpritKind",
        "GradProbe",
        "GradProbeSetupError",
        "GradProbeStoppingReason",
        "GradientCheckError",
        "ParameterCheck",
        "ProbeReport",
        "SecondOrderReport",
        "Verdict",
        "__version__",
        "default_rtol",
        "jacobians",
        "probe",
        "saliency",
    }
    assert lightning_gradprobe.GradProbe.__module__ == "lightning_gradprobe.callback"
    for name in lightning_gradprobe.__all__:
        obj = getattr(lightning_gradprobe, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_every_exception_and_every_type_a_report_hands_out_is_exported():
    import dataclasses
    import typing

    import lightning_gradprobe
    from lightning_gradprobe import _errors
    from lightning_gradprobe.core import report

    exceptions = {n for n, v in vars(_errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert exceptions <= set(lightning_gradprobe.__all__)
    # The types of the report's fields, and of the second-order report's, one level down.
    handed_out = set()
    for cls in (report.ProbeReport, report.SecondOrderReport, report.Culprit, report.ParameterCheck):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            handed_out |= {t.__name__ for t in _types_in(hints[field.name]) if t.__module__.startswith("lightning_")}
    assert handed_out == {"Verdict", "Culprit", "CulpritKind", "ParameterCheck", "SecondOrderReport"}
    assert handed_out <= set(lightning_gradprobe.__all__)


def _types_in(hint):
    import typing

    if isinstance(hint, type):
        return {hint}
    return {t for arg in typing.get_args(hint) for t in _types_in(arg)}


def _imports(path, package_root):
    """Modules of the package that ``path`` imports, at any depth (imports inside functions too)."""
    import ast

    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    # Imports for type checkers only (``if TYPE_CHECKING:``) never run.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return module, found


def test_no_import_circles_deferred_imports_counted():
    import graphlib
    from pathlib import Path

    import lightning_gradprobe

    root = Path(lightning_gradprobe.__file__).parent
    modules = dict(_imports(path, root) for path in root.rglob("*.py"))
    graph = {
        module: {
            target
            for target in imported
            if target in modules
            and target != module
            and not module.startswith(target + ".")
            and target != "lightning_gradprobe"
        }
        for module, imported in modules.items()
    }
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a circle


def test_every_import_outside_the_standard_library_is_a_declared_dependency():
    """Pictures are composed as arrays: no plotting library, and nothing imported that pyproject does not declare."""
    import re
    from pathlib import Path

    import lightning_gradprobe

    root = Path(lightning_gradprobe.__file__).parent
    block = re.search(r"^dependencies = \[(.*?)^\]", (root.parent / "pyproject.toml").read_text(), re.M | re.S)
    declared = {re.split(r"[<>=\[ ]", requirement)[0].lower() for requirement in re.findall(r'"([^"]+)"', block[1])}
    import_names = {"pillow": "PIL", "typing_extensions": "typing_extensions"}
    allowed = {import_names.get(name, name) for name in declared} | {"lightning_gradprobe", "numpy"}
    third_party = set()
    for path in root.rglob("*.py"):
        _, imported = _imports(path, root)
        third_party |= {
            name.split(".")[0] for name in imported if name and name.split(".")[0] not in sys.stdlib_module_names
        }
    assert "matplotlib" not in third_party
    assert third_party <= allowed, f"undeclared: {third_party - allowed}"
