"""The code's shape: imports point one way, functions stay short, the README's code map is true."""

import ast
import glob
import importlib
import os
import re
import sys
import tomllib

import pytest

from tests import launcher
from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "allconv_jax")
MAX_FUNCTION_LINES = 65  # "about 60"


def modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    out[rel.removesuffix(".__init__")] = path
  return out


def imports_of(path: str, known: set[str]) -> set[str]:
  """The package modules a file imports (at any level)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        name = f"{node.module}.{alias.name}"
        found.add(name if name in known else node.module)
  return {m for m in found if m in known and m != "allconv_jax"}


def test_no_import_cycles():
  mods = modules()
  graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
  state: dict[str, int] = {}

  def visit(m: str, trail: list[str]) -> None:
    if state.get(m) == 2:
      return
    assert state.get(m) != 1, f"import cycle: {' -> '.join(trail + [m])}"
    state[m] = 1
    for n in sorted(graph[m]):
      visit(n, trail + [m])
    state[m] = 2

  for m in sorted(graph):
    visit(m, [])
  assert "allconv_jax.train" not in graph["allconv_jax.transfer"]


def test_functions_are_short():
  long = []
  for path in modules().values():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({length})")
  assert not long, long


def test_the_code_map_names_every_module():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  code_map = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
  named = set(re.findall(r"[a-z_]+\.py", code_map))
  for path in modules().values():
    name = os.path.basename(path)
    assert name == "__init__.py" or name in named, f"{name} is missing from the code map"


def test_console_commands_point_at_programs():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert {"allconv-train", "allconv-report", "allconv-sweep", "allconv-study"} <= set(scripts)
  for target in scripts.values():
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), target


def test_help_texts_keep_their_line_breaks():
  # absl prints the program's docstring for --help: a backslash-newline in a plain docstring
  # would join two lines into one with a run of spaces.
  programs = [os.path.join(ROOT, "main.py"), *glob.glob(os.path.join(ROOT, "configs", "*.py")),
              *modules().values()]
  for path in programs:
    doc = ast.get_docstring(ast.parse(open(path).read()), clean=False) or ""
    assert not re.search(r"\S {5,}--", doc), f"{path}: {doc[:200]}"


@pytest.mark.parametrize("module", ["launch", "report"])
def test_a_console_command_prints_its_docstring_for_help(module):
  # A console command's __main__ is a wrapper without a docstring, like this -c script.
  code = f"from allconv_jax import {module}; {module}.run()"
  r = launcher.run([sys.executable, "-c", code, "--help"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  first = importlib.import_module(f"allconv_jax.{module}").__doc__.strip().splitlines()[0]
  assert first in r.stdout, r.stdout[:500] + r.stderr[-500:]  # (absl exits 1 after --help)
