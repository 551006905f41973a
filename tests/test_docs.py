"""The README and docs/ say what the code does: links, configs, modules and keys they name
exist, the README stays a front page, and the synthetic transfer flow of docs/transfer.md
trains as documented (at tiny scale)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import tomllib

import pytest

from allconv_jax import cli, train
from allconv_jax.config import flatten, get_config
from allconv_jax.errors import UserError
from tests.helpers import ROOT

README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
MAX_README_LINES = 200
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
CONFIG_FLAG = re.compile(r"--configs?=([^\s`'\"|]+)")
CONFIG_PATH = re.compile(r"(?<![\w/.])configs/[\w./*\[\]:,-]*")
MODULE = re.compile(r"python3? -m (allconv_jax[\w.]*)")
KEY = re.compile(r"--config\.([\w.]+)=")
CONSOLE = re.compile(r"(?<![\w-])(allconv-[a-z]+)")
PLACEHOLDER = re.compile(r"[A-Z*\[\]]")  # FILE[:ARG], NAME, configs/*.py


def text(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def page_id(path: str) -> str:
  return os.path.relpath(path, ROOT)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
  return re.sub(r"[^\w\- ]", "", plain.lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
  """Every heading's anchor in a markdown file (repeats get -1, -2, ... as on GitHub)."""
  seen: dict[str, int] = {}
  out = set()
  for line in text(path).splitlines():
    match = HEADING.match(line)
    if match:
      base = slug(match.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f"{base}-{n}")
  return out


def config_specs(page: str) -> list[str]:
  """The config files a page names: --config=/--configs= values and configs/... paths."""
  body = text(page)
  specs = [v for m in CONFIG_FLAG.finditer(body) for v in m.group(1).split(",")]
  specs += [m.group(0).rstrip(".,:") for m in CONFIG_PATH.finditer(body)]
  return [s for s in specs
          if s and not s.endswith("/") and not PLACEHOLDER.search(s.partition(":")[0])]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_point_at_files_and_headings(page):
  folder = os.path.dirname(page)
  for target in LINK.findall(text(page)):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(folder, path)) if path else page
    assert os.path.exists(resolved), f"{page_id(page)}: {target} does not exist"
    if anchor:
      assert resolved.endswith(".md"), f"{page_id(page)}: an anchor into a non-page: {target}"
      assert anchor in anchors(resolved), f"{page_id(page)}: no heading for #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_config_files_exist(page):
  specs = config_specs(page)
  for spec in specs:
    try:
      cli.resolve_config(spec)
    except UserError as e:
      pytest.fail(f"{page_id(page)}: {spec}: {e}")
  if page == README:
    assert "--config=" in text(page) and specs


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_modules_exist(page):
  for module in MODULE.findall(text(page)):
    found = PLACEHOLDER.search(module) or importlib.util.find_spec(module.rstrip("."))
    assert found is not None, f"{page_id(page)}: {module}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_console_commands_exist(page):
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = set(tomllib.load(f)["project"]["scripts"])
  for command in CONSOLE.findall(text(page)):
    if command != "allconv-jax":  # the project's (and the repository's) name
      assert command in scripts, f"{page_id(page)}: {command} is no console command"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_config_keys_exist(page):
  known = dict(flatten(get_config()))
  for key in KEY.findall(text(page)):
    assert PLACEHOLDER.search(key) or key in known, f"{page_id(page)}: --config.{key} is unknown"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_path_of_this_machine(page):
  for prefix in ("/work/", "/root/"):
    assert prefix not in text(page), f"{page_id(page)} names {prefix}"


def test_the_readme_is_a_front_page():
  lines = text(README).splitlines()
  assert len(lines) <= MAX_README_LINES, len(lines)
  docs = {os.path.basename(p) for p in PAGES[1:]}
  linked = {os.path.basename(t.partition("#")[0]) for t in LINK.findall(text(README))}
  assert docs <= linked, f"pages the README does not link: {sorted(docs - linked)}"


def test_the_checks_catch_what_they_look_for(tmp_path):
  # The regular expressions above find what a broken page would hold.
  page = tmp_path / "page.md"
  page.write_text("# A `b` (c)\n[x](missing.md) [y](#a-b-c) --config=configs/nope.py "
                  "--config.model.nope=1 python -m allconv_jax.nope")
  assert LINK.findall(page.read_text()) == ["missing.md", "#a-b-c"]
  assert anchors(str(page)) == {"a-b-c"}
  assert config_specs(str(page)) == ["configs/nope.py", "configs/nope.py"]
  assert KEY.findall(page.read_text()) == ["model.nope"]
  assert importlib.util.find_spec(MODULE.findall(page.read_text())[0]) is None
  with pytest.raises(UserError):
    cli.resolve_config("configs/nope.py")


# ------------------------------------------------- the synthetic transfer flow of docs/transfer.md

# The flow at tiny scale: the same configs and settings as the documented commands, on fewer
# images and epochs (the source still fits its data well, which is what makes a linear class
# layer's logits large without the final ReLU).
TINY = ("--config.data.source=synthetic", "--config.batch_size=32", "--config.tensorboard=False",
        "--config.model.width_multiplier=0.25", "--config.data.max_train_examples=1024",
        "--config.data.validation_size=100", "--config.data.max_test_examples=100",
        "--config.eval_batch_size=100", "--config.checkpoint.every_epochs=100")
# docs/transfer.md: without the final ReLU, steps 1 and 2 train at rate 0.001.
NO_RELU = ("--config.model.final_relu=False", "--config.optimizer.learning_rate=0.001")
CHANCE = 0.1  # 10 classes


def run(config: str, workdir: str, *flags: str) -> list[dict]:
  """Trains `config` with the flags in this process; its metrics records."""
  train.train_and_evaluate(cli.config_from_file(config, [*TINY, *flags]), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_the_synthetic_transfer_flow_trains_as_documented(tmp_path):
  source = str(tmp_path / "source")
  fitted = run("all_cnn_c", source, "--config.num_epochs=4")
  assert fitted[-1]["val_accuracy"] > 3 * CHANCE, fitted[-1]
  for name, extra in (("relu", ()), ("no_relu", NO_RELU)):
    step1, step2 = str(tmp_path / f"{name}_step1"), str(tmp_path / f"{name}_step2")
    steps = [run("transfer_step1", step1, "--config.num_epochs=2",
                 f"--config.transfer.source={source}", *extra),
             run("transfer_step2", step2, "--config.num_epochs=2",
                 f"--config.transfer.source={step1}", *extra)]
    for records in steps:  # a non-finite loss would have stopped the run (TrainingDiverged)
      assert len(records) == 2 and all(math.isfinite(r["train_loss"]) for r in records)
      if name == "no_relu":  # with the ReLU the new class layer may die (documented)
        assert records[-1]["val_accuracy"] > 2.5 * CHANCE, (name, records[-1])
