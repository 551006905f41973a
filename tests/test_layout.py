"""The code's shape: imports point one way (the core never imports the tools), no private jax
API, modules of a readable size, an install that ships the library and not configs/, and
docs/architecture.md naming every module."""

from __future__ import annotations

import ast
import glob
import importlib
import os
import re
import sys
import tomllib
import types

import pytest
import setuptools

from allconv_jax import cli
from tests.helpers import ROOT

PACKAGE = os.path.join(ROOT, "allconv_jax")
TOOLS = "allconv_jax.tools"
MAX_MODULE_LINES = 400
SKIPPED_FOLDERS = {"__pycache__", "build", "dist", "node_modules"}
PRIVATE_JAX = re.compile(r"\bjax\._src\b|\bfrom\s+jax\s+import\s+[^\n]*\b_src\b")


def modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    out[rel.removesuffix(".__init__")] = path
  return out


def imported(path: str) -> set[str]:
  """Every name a file imports, at any level, fully qualified: 'a.b' for `import a.b`, and both
  'a' and 'a.b' for `from a import b` (b may be a module or an attribute)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert node.level == 0, f"{path}:{node.lineno}: a relative import"
      names.add(node.module)
      names |= {f"{node.module}.{a.name}" for a in node.names}
  return names


def package_imports(path: str, known: set[str]) -> set[str]:
  """The package's modules a file imports (the deepest known prefix of each imported name)."""
  found = set()
  for name in imported(path):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
      if ".".join(parts[:i]) in known:
        found.add(".".join(parts[:i]))
        break
  return found - {"allconv_jax"}


def is_tools(name: str) -> bool:
  return name == TOOLS or name.startswith(TOOLS + ".")


def repository_python_files() -> list[str]:
  """The repository's .py files (no hidden folders, caches, builds or virtual environments)."""
  out = []
  for folder, subfolders, names in os.walk(ROOT):
    subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS
                     and not d.endswith(".egg-info")
                     and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
    out += [os.path.join(folder, n) for n in names if n.endswith(".py")]
  return sorted(out)


# ----------------------------------------------------------------------------- imports


def test_no_import_cycles():
  mods = modules()
  graph = {m: package_imports(p, set(mods)) - {m} for m, p in mods.items()}
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
  assert "allconv_jax.train" in graph["allconv_jax.launch"]  # the graph sees imports at all
  assert "allconv_jax.train" not in graph["allconv_jax.transfer"]


def test_only_the_tools_import_the_tools():
  """The library (training, data, models, the CLI plumbing) never imports allconv_jax/tools;
  neither do the config files (a study file returns plain dicts)."""
  offenders = []
  for name, path in modules().items():
    if not is_tools(name):
      offenders += [f"{name} imports {n}" for n in sorted(imported(path)) if is_tools(n)]
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    rel = os.path.relpath(path, ROOT)
    offenders += [f"{rel} imports {n}" for n in sorted(imported(path))
                  if is_tools(n)]
  assert not offenders, offenders


def test_the_tools_are_modules_of_the_package():
  tools = [m for m in modules() if is_tools(m)]
  assert {"allconv_jax.tools.sweep", "allconv_jax.tools.report", "allconv_jax.tools.study",
          "allconv_jax.tools.benchmark", "allconv_jax.tools.evaluate",
          "allconv_jax.tools.visualize"} <= set(tools), tools


def test_no_private_jax_api():
  users = []
  for path in repository_python_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    users += [f"{os.path.relpath(path, ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
              for m in PRIVATE_JAX.finditer(text)]
  assert not users, users


def test_the_private_api_check_sees_private_imports():
  """test_no_private_jax_api's pattern on the forms it must catch (so it can fail)."""
  src = "_" + "src"  # (spelled apart so that this file passes the check)
  for line in (f"from jax.{src} import xla_bridge", f"import jax.{src}.core as core",
               f"from jax import numpy, {src}", f"x = jax.{src}.api"):
    assert PRIVATE_JAX.search(line), line
  assert not PRIVATE_JAX.search("from jax import numpy as jnp  # a public API")


# ----------------------------------------------------------------------------- size


def test_modules_stay_under_400_lines():
  long = []
  for path in modules().values():
    with open(path) as f:
      n = sum(1 for _ in f)
    if n > MAX_MODULE_LINES:
      long.append(f"{os.path.relpath(path, ROOT)} ({n} lines)")
  assert not long, long


# ----------------------------------------------------------------------------- packaging


def pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_an_install_ships_the_library_and_not_configs():
  """`pip install .` (and -e .) packages what [tool.setuptools.packages.find] finds: the
  library with its subpackages (allconv_jax/tools has no __init__.py: a namespace package,
  which setuptools finds from pyproject.toml by default), never a top-level `configs`."""
  find = pyproject()["tool"]["setuptools"]["packages"]["find"]
  assert "include" in find, "without an include, every folder with Python files is a package"
  where = os.path.join(ROOT, *find.get("where", ["."])[:1])
  kwargs = {"where": where, "include": find["include"], "exclude": find.get("exclude", ())}
  namespaces = setuptools.find_namespace_packages(**kwargs)
  plain = setuptools.find_packages(**kwargs)
  shipped = namespaces if find.get("namespaces", True) else plain
  for found in (namespaces, plain, shipped):
    assert not [p for p in found if p == "configs" or p.startswith("configs.")], found
  assert {"allconv_jax", "allconv_jax.cpu", "allconv_jax.data", TOOLS} <= set(shipped), shipped
  data = pyproject()["tool"]["setuptools"]["package-data"]["allconv_jax.cpu"]
  assert any(glob.glob(os.path.join(PACKAGE, "cpu", pattern)) for pattern in data), data


def test_console_commands_point_at_programs():
  scripts = pyproject()["project"]["scripts"]
  assert {"allconv-train", "allconv-report", "allconv-sweep", "allconv-study"} <= set(scripts)
  for target in scripts.values():
    module, _, name = target.partition(":")
    assert module in modules(), target
    with open(modules()[module]) as f:
      functions = {n.name: n for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert name in functions, target
    # absl prints __main__'s docstring for --help; a console command's __main__ is a wrapper
    calls = {ast.unparse(n.func): n.lineno for n in ast.walk(functions[name])
             if isinstance(n, ast.Call)}
    assert "cli.program_help" in calls, f"{target} does not give --help its docstring"
    assert calls["cli.program_help"] < calls.get("app.run", sys.maxsize), target


def test_console_command_modules_import():
  for target in pyproject()["project"]["scripts"].values():
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), target


# ----------------------------------------------------------------------------- help and docs


def test_help_texts_keep_their_line_breaks():
  # absl prints the program's docstring for --help: a backslash-newline in a plain docstring
  # would join two lines into one with a run of spaces.
  programs = [os.path.join(ROOT, "main.py"), *glob.glob(os.path.join(ROOT, "configs", "*.py")),
              *modules().values()]
  for path in programs:
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
    assert not re.search(r"\S {5,}--", doc), f"{path}: {doc[:200]}"


def test_program_help_fills_only_a_missing_docstring(monkeypatch):
  """What makes `allconv-train --help` print launch.py's docstring (every console command's
  run() calls it: test_console_commands_point_at_programs)."""
  wrapper = types.ModuleType("__main__")  # a console command's generated __main__
  monkeypatch.setitem(sys.modules, "__main__", wrapper)
  cli.program_help("the tool's docstring")
  assert wrapper.__doc__ == "the tool's docstring"
  script = types.ModuleType("__main__", "main.py's own docstring")
  monkeypatch.setitem(sys.modules, "__main__", script)
  cli.program_help("the tool's docstring")
  assert script.__doc__ == "main.py's own docstring"


def named_in(text: str, name: str, path: str, basenames: dict[str, int]) -> bool:
  """Whether `text` names the module: its dotted name, its path under allconv_jax/ (or, for a
  package, its folder), or its file name where no other module has that name."""
  rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
  forms = [name, rel]
  if rel.endswith("/__init__.py"):
    forms.append(rel.removesuffix("__init__.py"))  # 'cpu/'
  elif basenames[os.path.basename(rel)] == 1:
    forms.append(os.path.basename(rel))
  return any(re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", text) for f in forms)


def has_code(path: str) -> bool:
  """Whether a file defines anything (an __init__.py with only a docstring or a version needs
  no entry)."""
  with open(path) as f:
    body = ast.parse(f.read()).body
  return any(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom))
             for n in body)


def test_the_architecture_doc_names_every_module():
  doc = os.path.join(ROOT, "docs", "architecture.md")
  assert os.path.exists(doc), "docs/architecture.md is missing"
  with open(doc) as f:
    text = f.read()
  mods = modules()
  basenames: dict[str, int] = {}
  for path in mods.values():
    basenames[os.path.basename(path)] = basenames.get(os.path.basename(path), 0) + 1
  missing = [name for name, path in sorted(mods.items())
             if (not path.endswith("__init__.py") or has_code(path))
             and not named_in(text, name, path, basenames)]
  assert not missing, f"docs/architecture.md does not name {', '.join(missing)}"


@pytest.mark.parametrize("text, named", [
    ("`allconv_jax/cpu/onednn.py` runs ...", True),
    ("cpu/onednn.py", True),
    ("allconv_jax.cpu.onednn", True),
    ("`onednn.py`", True),  # the only module of that name
    ("onednn_conv.cc", False),
    ("cpu/polyphase.py", False),
])
def test_the_architecture_check_reads_names_as_meant(text, named):
  path = os.path.join(PACKAGE, "cpu", "onednn.py")
  assert named_in(text, "allconv_jax.cpu.onednn", path, {"onednn.py": 1}) == named
