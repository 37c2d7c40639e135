"""Packaging: `configs` is never installed into site-packages (where it would shadow a user's own
package of that name), and experiment files still find it from any working directory."""

import configparser
import os
import subprocess
import sys

import setuptools

from jaxlm import cli


def test_configs_is_not_an_installed_package(repo_root):
  setup = configparser.ConfigParser()
  setup.read(os.path.join(repo_root, "setup.cfg"))
  include = setup["options.packages.find"]["include"].split()
  packages = setuptools.find_packages(where=repo_root, include=include)
  assert "jaxlm" in packages and "jaxlm.models" in packages
  assert not [p for p in packages if p == "configs" or p.startswith("configs.")], packages


def test_the_config_file_brings_its_checkout_onto_the_path(repo_root, monkeypatch):
  monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != repo_root])
  cli.add_config_root(["train", f"--config={os.path.join(repo_root, 'experiments', 'x.py')}"])
  assert sys.path[0] == repo_root
  cli.add_config_root(["train", "--config", "/nowhere/experiments/x.py"])  # No checkout: no change.
  assert sys.path[0] == repo_root


def test_train_loads_an_experiment_from_another_directory(repo_root, tmp_path):
  """From a folder with no configs/ in reach, the experiment (which imports `configs`) still
  loads: the run gets as far as checking the overrides against its config."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  command = [sys.executable, "-m", "jaxlm.train",
             f"--config={os.path.join(repo_root, 'experiments', 'bert_tiny.py')}",
             f"--workdir={tmp_path / 'run'}", "--config.train.stepz=1"]
  done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Unknown config key 'train.stepz'" in done.stderr, done.stderr[-3000:]
  assert "Did you mean 'train.steps'" in done.stderr


def test_entry_points_use_a_persistent_compilation_cache(monkeypatch):
  import jax

  from jaxlm import cli

  chosen = jax.config.jax_compilation_cache_dir  # The tests' own cache (conftest).
  assert chosen
  try:
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == chosen  # A cache the user chose is kept.
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("JAXLM_COMPILATION_CACHE", "0")
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.delenv("JAXLM_COMPILATION_CACHE")
    cli.use_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == cli.COMPILATION_CACHE
  finally:
    jax.config.update("jax_compilation_cache_dir", chosen)
