"""Every config file loads and passes the checks; the recipes hold their sources' settings."""

import glob
import os

import pytest
from absl import flags
from ml_collections import config_flags

from allconv_jax import cli, input_pipeline, optim, paper
from allconv_jax import config as config_lib
from allconv_jax.errors import UserError
from tests.helpers import ROOT, run_main


def load(spec: str):
  """A config as main.py loads it: 'configs/x.py' or 'configs/x.py:argument'."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  values(["test", f"--config={os.path.join(ROOT, spec)}"])
  return values.config


FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py")
               and not os.path.basename(p).startswith("study_"))  # studies: test_study.py
SPECS = [*FILES, *(f"configs/recipe_course.py:{n}" for n in paper.COURSE_CIFAR10),
         *(f"configs/recipe_course_transfer.py:{s},{c}" for s in ("step1", "step2", "scratch")
           for c in ("class1", "class2")),
         *(f"configs/recipe_paper.py:{n}" for n in paper.NETWORKS)]


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_validates_and_documents_its_command(spec):
  config = load(spec)
  config_lib.validate(config)
  with open(os.path.join(ROOT, spec.split(":")[0])) as f:
    assert "python main.py --config=configs/" in f.read(), "its docstring holds its run command"


def test_caffe_recipe():
  c = load("configs/recipe_caffe.py")
  assert (c.batch_size, c.optimizer.learning_rate, c.model.kernel_init, c.model.bias_init,
          c.model.padding, c.data.preprocessing, c.data.augment) == (
              256, 0.05, "caffe_xavier", 0.0, "symmetric", "gcn_zca", False)
  steps_per_epoch = 50_000 // 256  # its protocol: all 50,000 images
  schedule = optim.make_schedule(c.optimizer, steps_per_epoch)
  bounds = [round(b * steps_per_epoch) for b in c.optimizer.boundaries]
  assert [abs(b - want) < steps_per_epoch for b, want in zip(bounds, (40_000, 50_000, 60_000),
                                                               strict=True)] == [True] * 3
  assert abs(c.num_epochs * steps_per_epoch - 70_000) < steps_per_epoch
  assert float(schedule(bounds[0] - 1)) == pytest.approx(0.05)
  assert float(schedule(bounds[2])) == pytest.approx(0.05e-3)


def test_neon_recipe():
  c = load("configs/recipe_neon.py")
  assert (c.model.kernel_init, c.model.init_std, c.model.use_bias, c.optimizer.learning_rate,
          tuple(c.optimizer.boundaries), c.num_epochs, c.optimizer.weight_decay) == (
              "gaussian", 0.05, False, 0.05, (200, 250, 300), 350, 0.001)


@pytest.mark.parametrize("network", sorted(paper.COURSE_CIFAR10))
def test_course_recipe_uses_table3_rates(network):
  c = load(f"configs/recipe_course.py:{network}")
  rates = paper.COURSE_CIFAR10[network][1]
  schedule = optim.make_schedule(c.optimizer, steps_per_epoch=10)
  got = [float(schedule(e * 10)) for e in (0, 199, 200, 250, 300, 349)]
  assert got == pytest.approx([rates[0], rates[0], rates[1], rates[2], rates[3], rates[3]])
  assert (c.batch_size, c.data.preprocessing, c.data.validation_size, c.model.kernel_init) == (
      4, "meanstd", 1000, "he_normal")


def test_course_transfer_recipe():
  step1, step2, scratch = (load(f"configs/recipe_course_transfer.py:{s},class2")
                           for s in ("step1", "step2", "scratch"))
  for c in (step1, step2, scratch):
    assert c.data.subset == "class2" and c.data.validate_on_test and c.batch_size == 4
    assert input_pipeline.num_classes(c.data) == 10
  assert (step1.num_epochs, step2.num_epochs, scratch.num_epochs) == (50, 50, 350)
  schedule = optim.make_schedule(step1.optimizer, steps_per_epoch=10)
  assert float(schedule(499)) == pytest.approx(0.025)  # constant over its 50 epochs
  assert step1.optimizer.freeze == "backbone/" and not step2.optimizer.freeze
  assert step2.transfer.source.endswith("course_class2_step1") and not scratch.transfer.source


@pytest.mark.parametrize("spec", ["configs/recipe_course.py:strided_cnn_a",
                                  "configs/recipe_course_transfer.py:step3,class1"])
def test_recipe_arguments_are_checked(spec):
  with pytest.raises(flags.IllegalFlagValueError, match="ValueError"):
    load(spec)


def test_a_mistyped_key_gets_a_did_you_mean():
  assert config_lib.did_you_mean("optimizer.learning_rat", ["optimizer.learning_rate", "seed"]) \
      == " (did you mean 'optimizer.learning_rate'?)"
  assert config_lib.did_you_mean("zzz", ["seed"]) == ""
  assert "did you mean 'model.width_multiplier'" in cli.unknown_override(
      ["--config.model.width_multiplyer=0.5"])


# ----------------------------------------------------------------------------- naming a config


def test_a_config_is_named_by_path_or_bare_name_from_any_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # not the repository
  want = os.path.join(ROOT, "configs", "all_cnn_c.py")
  for spec in ("all_cnn_c", "all_cnn_c.py", "configs/all_cnn_c.py", want):
    assert cli.resolve_config(spec) == want, spec
  assert cli.resolve_config("recipe_course:all_cnn_c") == (
      os.path.join(ROOT, "configs", "recipe_course.py") + ":all_cnn_c")
  (tmp_path / "all_cnn_c.py").write_text("from configs.all_cnn_c import get_config\n")
  assert cli.resolve_config("all_cnn_c.py") == str(tmp_path / "all_cnn_c.py")  # here first
  config = cli.config_from_file("model_c", ["--config.num_epochs=3"])
  assert (config.model.name, config.num_epochs) == ("model_c", 3)
  with pytest.raises(UserError) as e:
    cli.resolve_config("all_cnn_z")
  assert str(e.value) == (f"config file all_cnn_z not found (a path, or a name in "
                          f"{os.path.join(ROOT, 'configs')}, e.g. all_cnn_c)")
  assert cli.resolve_config_flag(["main.py", "--config=all_cnn_z", "--config", "model_c"]) == [
      "main.py", "--config=all_cnn_z", "--config", os.path.join(ROOT, "configs", "model_c.py")]


def test_main_takes_a_bare_config_name_from_another_folder(tmp_path):
  r = run_main("--config=all_cnn_c", "--summary", "--config.model.width_multiplier=0.5",
               cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "AllConvNet Summary" in r.stdout
  assert r.stdout.strip().splitlines()[-1] == "total parameters: 343,882"  # width x0.5
