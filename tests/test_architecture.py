"""The layering the architecture promises (docs/architecture.md), checked on the source itself:
models/ never imports convert/, nothing below the drivers imports them, and the drivers hold no
string naming a task (everything about a task lives with the task)."""
import ast
import pathlib

import pytest

from dense_diffusion import tasks

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dense_diffusion"
DRIVERS = ("train.py", "evaluate.py", "predict.py", "demo.py", "pseudo_label.py")


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports (absolute names; `from a import b` gives a and a.b)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{alias.name}" for alias in node.names)
  return out


def _files(folder: str) -> list[pathlib.Path]:
  return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("folder,forbidden", [
    ("models", ("dense_diffusion.convert", "dense_diffusion.experiment")),
    ("convert", ("dense_diffusion.experiment",)),
    ("tasks", ("dense_diffusion.experiment", "dense_diffusion.paradigms",
               "dense_diffusion.input_pipeline")),
    # Paradigms may build the modules they add (models/), never read checkpoints (convert/).
    ("paradigms", ("dense_diffusion.experiment", "dense_diffusion.convert")),
    ("diffusion", ("dense_diffusion.paradigms", "dense_diffusion.experiment")),
    ("experiment", ("dense_diffusion.train", "dense_diffusion.evaluate",
                    "dense_diffusion.predict", "dense_diffusion.demo")),
])
def test_dependencies_point_down(folder, forbidden):
  files = _files(folder)
  assert files
  for path in files:
    bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


@pytest.mark.parametrize("driver", DRIVERS)
def test_drivers_name_no_task(driver):
  names = set(tasks.names())
  assert {"depth", "panoptic", "derain"} <= names
  found = [(node.lineno, node.value) for node in ast.walk(ast.parse((PACKAGE / driver).read_text()))
           if isinstance(node, ast.Constant) and isinstance(node.value, str)
           and node.value in names]
  assert not found, f"{driver} names tasks: {found}"
