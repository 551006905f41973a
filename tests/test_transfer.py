"""Transfer learning: frozen backbone (step 1), fine-tuning (step 2), source checks."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from allconv_jax import checkpointing, cli, cpu, files, input_pipeline, models, transfer
from allconv_jax import train as train_lib
from allconv_jax.data import preprocessing
from allconv_jax.errors import UserError
from configs import scratch_subset, transfer_step1, transfer_step2
from tests.helpers import tiny_config, tiny_flags

# One worker: its tests share the transfer runs; among the longest (scheduled first).
pytestmark = [pytest.mark.xdist_group("transfer"), pytest.mark.slow]


def leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def params(workdir, which="latest"):
  """(config, params) of a run's checkpoint."""
  config, tree, _ = checkpointing.load_checkpoint(workdir, which)
  return config, tree


def subset_config(**kw):
  return tiny_config(data__dataset="cifar100", data__subset="class1", data__max_train_examples=448,
                     **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run):
  """A CIFAR-10 source run, a step-1 run from it and a step-2 run from that."""
  root = tmp_path_factory.mktemp("transfer")
  source = trained_run(1)  # tiny_config(num_epochs=1), shared with other tests: read only
  step1, step2 = (str(root / n) for n in ("step1", "step2"))
  train_lib.train_and_evaluate(
      subset_config(num_epochs=2, transfer__source=source, optimizer__freeze="backbone/"), step1)
  train_lib.train_and_evaluate(
      subset_config(num_epochs=2, transfer__source=step1, transfer__new_classifier=False),
      step2)
  return source, step1, step2


def test_step1_keeps_the_backbone_bit_identical_and_trains_the_class_layer(runs):
  source, step1, _ = runs
  _, src = params(source)
  config, got = params(step1)
  assert set(got) == {"backbone", "classifier"}
  for (path, a), (_, b) in zip(leaves(src["backbone"]), leaves(got["backbone"]), strict=True):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path
  assert got["classifier"]["kernel"].shape == (1, 1, 10, 10)
  fresh = models.init_params(models.create_model(config.model, 10, cpu.Convolutions()),
                             jax.random.fold_in(jax.random.key(config.seed), 0))
  for (path, a), (_, b) in zip(leaves(fresh["classifier"]), leaves(got["classifier"]),
                               strict=True):
    assert not np.array_equal(np.asarray(a), np.asarray(b)), path


def test_step2_changes_every_parameter(runs):
  _, step1, step2 = runs
  _, before = params(step1)
  _, after = params(step2)
  for (path, a), (_, b) in zip(leaves(before), leaves(after), strict=True):
    changed = np.mean(np.asarray(a) != np.asarray(b))
    assert changed > 0.9, (path, changed)


def test_transfer_reuses_the_source_preprocessing_and_records_the_source(runs):
  source, step1, step2 = runs
  src = preprocessing.load_preprocessing(os.path.join(source, "preprocessing.npz"))
  for run in (step1, step2):
    got = preprocessing.load_preprocessing(os.path.join(run, "preprocessing.npz"))
    assert src.keys() == got.keys()
    assert all(np.array_equal(src[k], got[k]) for k in src)
  with open(os.path.join(step1, "results.json")) as f:
    res = json.load(f)
  assert res["transfer_source"] == source and res["dataset"] == "cifar100"
  assert res["subset"] == "class1" and len(res["classes"]) == 10


def test_step1_from_best_checkpoint(runs, tmp_path):
  # A source whose best checkpoint is older than its newest: step 2's run, marked best at its
  # first epoch. A frozen backbone must then be that older checkpoint's, not the newest's.
  _, _, step2 = runs
  source = tmp_path / "source"
  shutil.copytree(step2, source)
  first, last = files.checkpoint_steps(str(source))[0], files.checkpoint_steps(str(source))[-1]
  files.write_json(str(source / files.BEST), {"epoch": 1, "val_accuracy": 0.5, "step": first})
  out = train_lib.train_and_evaluate(
      subset_config(num_epochs=1, transfer__source=str(source), transfer__checkpoint="best",
                    optimizer__freeze="backbone/"), str(tmp_path / "run"))
  assert out["transfer_source"] == str(source)
  _, got = params(str(tmp_path / "run"))
  _, best = params(str(source), "best")
  _, latest = params(str(source), "latest")
  assert first != last
  for (path, a), (_, b), (_, c) in zip(leaves(got["backbone"]), leaves(best["backbone"]),
                                       leaves(latest["backbone"]), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
    assert not np.array_equal(np.asarray(a), np.asarray(c)), path


def test_source_errors(runs, tmp_path):
  source, step1, _ = runs
  with pytest.raises(UserError, match="transfer.source: .* does not exist"):
    transfer.check_source(subset_config(transfer__source=str(tmp_path / "nope")))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="not a run's workdir"):
    transfer.check_source(subset_config(transfer__source=str(tmp_path / "empty")))
  with pytest.raises(UserError, match="holds an all_cnn_c of width x0.05; this config builds a "
                                      "model_c of width x0.05"):
    transfer.check_source(subset_config(transfer__source=source, model__name="model_c"))
  with pytest.raises(UserError, match="width x0.05; this config builds an all_cnn_c of width "
                                      "x0.1"):
    transfer.check_source(subset_config(transfer__source=source, model__width_multiplier=0.1))
  with pytest.raises(UserError, match="class layer for 10 classes, this run has 100"):
    transfer.check_source(tiny_config(data__dataset="cifar100", transfer__source=step1,
                                      transfer__new_classifier=False))
  nockpt = tmp_path / "nockpt"
  nockpt.mkdir()
  (nockpt / "config.json").write_text(open(os.path.join(source, "config.json")).read())
  with pytest.raises(UserError, match="has no checkpoints"):
    transfer.check_source(subset_config(transfer__source=str(nockpt)))


def test_a_wrong_source_is_one_line_before_any_compute(runs, tmp_path):
  """configs/transfer_step1.py with main.py's overrides, on a source of another network."""
  source, _, _ = runs
  config = cli.config_from_file("configs/transfer_step1.py", tiny_flags(
      model__name="model_a", transfer__source=source, data__dataset="cifar100",
      data__subset="class1"))
  with pytest.raises(UserError) as e:
    train_lib.train_and_evaluate(config, str(tmp_path / "w"))
  assert "holds an all_cnn_c of width x0.05; this config builds a model_a" in str(e.value)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "w").exists()


def test_a_source_with_only_unreadable_checkpoints_fails_before_the_workdir(runs, tmp_path):
  """Every checkpoint of the source damaged: one line naming the source, and no workdir (the
  source is read before the new run's folder is made)."""
  source = shutil.copytree(runs[0], tmp_path / "source")
  for data in glob.glob(f"{source}/checkpoints/*/**/d/*", recursive=True):
    with open(data, "wb") as f:
      f.write(b"garbage")
  config = cli.config_from_file("configs/transfer_step1.py", tiny_flags(
      transfer__source=str(source), data__dataset="cifar100", data__subset="class1"))
  with pytest.raises(UserError, match=f"no usable checkpoint in {source}/checkpoints") as e:
    train_lib.train_and_evaluate(config, str(tmp_path / "w"))
  assert "\n" not in str(e.value) and "restart" not in str(e.value)
  assert not (tmp_path / "w").exists()


def test_transfer_configs():
  step1, step2, scratch = (m.get_config() for m in (transfer_step1, transfer_step2,
                                                    scratch_subset))
  assert step1.optimizer.freeze == "backbone/" and step1.transfer.new_classifier
  assert step1.num_epochs == 50 and step2.num_epochs == 50 and scratch.num_epochs == 350
  assert step2.optimizer.freeze == "" and not step2.transfer.new_classifier
  assert scratch.transfer.source == ""
  for c in (step1, step2, scratch):
    assert c.data.dataset == "cifar100" and c.data.subset == "class1"
    assert input_pipeline.num_classes(c.data) == 10


def test_source_padding_and_biases_must_match(runs, tmp_path):
  source, _, _ = runs
  with pytest.raises(UserError, match="trained with model.padding=symmetric; set model.padding="):
    transfer.check_source(subset_config(transfer__source=source, model__padding="tf_same"))
  with pytest.raises(UserError, match="trained with model.use_bias=True; set model.use_bias=True"):
    transfer.check_source(subset_config(transfer__source=source, model__use_bias=False))
  legacy = tmp_path / "legacy"  # a run saved before model.padding existed padded as TF SAME
  legacy.mkdir()
  saved = json.load(open(os.path.join(source, "config.json")))
  del saved["model"]["padding"], saved["model"]["use_bias"]
  (legacy / "config.json").write_text(json.dumps(saved))
  assert checkpointing.read_run_config(str(legacy)).model.padding == "tf_same"
  with pytest.raises(UserError, match="trained with model.padding=tf_same"):
    transfer.check_source(subset_config(transfer__source=str(legacy)))


def test_reusing_a_class_layer_of_other_classes_is_refused(runs):
  source, step1, _ = runs  # source: CIFAR-10 (10 classes); class1: 10 CIFAR-100 classes
  with pytest.raises(UserError, match="class layer for cifar10 .airplane, automobile, bird, "
                                      r"\.\.\.., this run classifies cifar100 .bus"):
    transfer.check_source(subset_config(transfer__source=source, transfer__new_classifier=False))
  transfer.check_source(subset_config(transfer__source=step1, transfer__new_classifier=False))


def test_step1_says_what_it_restored_and_froze(runs, tmp_path, capsys):
  source, _, _ = runs
  train_lib.train_and_evaluate(
      subset_config(num_epochs=1, transfer__source=source, optimizer__freeze="backbone/"),
      str(tmp_path))
  out = capsys.readouterr().out
  steps = files.checkpoint_steps(source)
  assert (f"transfer: restored the latest checkpoint of {source} (step {steps[-1]}): a new class "
          "layer; 16 arrays frozen, 2 trained") in out  # 8 backbone convs, kernel and bias each
  assert f"reused the meanstd preprocessing statistics of {source}\n" in out


def test_a_transfer_step_takes_the_source_model_settings_it_leaves_at_default(runs, tmp_path,
                                                                             capsys):
  source, _, _ = runs  # width x0.05
  out = train_lib.train_and_evaluate(
      subset_config(num_epochs=1, transfer__source=source, optimizer__freeze="backbone/",
                    model__width_multiplier=1.0), str(tmp_path))  # 1.0: the default
  assert out["width_multiplier"] == 0.05
  assert "from transfer.source: model.width_multiplier=0.05" in capsys.readouterr().out
