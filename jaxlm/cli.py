"""What every `python -m jaxlm.<verb>` entry point shares: flag parsing that turns config
mistakes into plain messages, `UserError`s printed without traceback, and multi-host start-up."""

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from jaxlm import huge_pages
from jaxlm.errors import UserError, closest

_COORDINATOR = "coordinator_address"


def define_distributed_flags() -> None:
  flags.DEFINE_string(_COORDINATOR, None, "HOST:PORT of process 0, for several processes.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")


def initialize_distributed() -> None:
  """Starts `jax.distributed` when asked, or when a TPU pod / SLURM environment provides it."""
  import os

  import jax

  if flags.FLAGS[_COORDINATOR].value:
    jax.distributed.initialize(
        coordinator_address=flags.FLAGS[_COORDINATOR].value,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
    )
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def add_config_root(argv: list[str]) -> None:
  """Puts the checkout holding a `--config` file's `configs/` package first on `sys.path`.

  Experiment files import the shared pieces (`from configs import recipes`), and `configs` is
  deliberately not installed into site-packages, where a package of that name would shadow a
  user's own. So the pieces are found next to the experiment: from a clone, an editable install
  or a notebook, whatever the working directory.
  """
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    else:
      continue
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(3):  # experiments/x.py, experiments/group/x.py, or a file beside configs/.
      if os.path.isfile(os.path.join(folder, "configs", "__init__.py")):
        if folder not in sys.path:
          sys.path.insert(0, folder)
        return
      folder = os.path.dirname(folder)


def use_saved_config(argv: list[str]) -> list[str]:
  """For the verbs that read a trained run (`evaluate`, `predict`, `export`): without a
  `--config`, the run's own saved config is the one `--config.k=v` overrides."""
  if any(a.startswith(("--config=", "-config=")) or a in ("--config", "-config") for a in argv):
    return argv
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith(("--workdir=", "-workdir="))),
                 None)
  if workdir is None:
    return argv  # absl reports the missing required flag.
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    _fail(f"{workdir} is not a jaxlm run folder (it has no config.json): pass the --workdir of "
          "a `python -m jaxlm.train` run.")
  from jaxlm.training import pretrained

  return argv[:1] + [f"--config={pretrained.__file__}:{workdir}"] + argv[1:]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes reported as one plain paragraph."""
  add_config_root(argv)
  try:
    return flags.FLAGS(argv)
  except (flags.UnrecognizedFlagError, AttributeError, KeyError) as e:
    name = getattr(e, "flagname", None) or _first_unknown_override(argv)
    if name and name.startswith("config."):
      # config_flags registers one flag per existing config key: those are the valid keys.
      known = [n[len("config."):] for n in flags.FLAGS if n.startswith("config.")]
      key = name[len("config."):]
      hint = closest(key, known)
      suggested = re.search(r'Did you mean "([^"]+)"', str(e))  # ml_collections' own hint.
      if not hint and suggested:
        hint = f" Did you mean '{'.'.join(key.split('.')[:-1] + [suggested.group(1)])}'?"
      _fail(f"Unknown config key '{key}' (from --{name}): the config has no such key.{hint} "
            "Every key is listed, with its meaning, in configs/base.py.")
    if name:
      _fail(f"Unknown flag --{name}. Run with --helpfull to list the flags.")
    _fail(f"Bad command-line override: {e}.")
  except flags.Error as e:
    _fail(f"{e}. Run with --helpfull to list the flags.")
  except (TypeError, ValueError) as e:
    _fail(f"Bad command-line override: {e}.")


def _first_unknown_override(argv: list[str]) -> str | None:
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and name not in flags.FLAGS:
      return name
  return None


def _fail(message: str) -> None:
  print(f"Error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietLibraries:
  """Drops INFO lines of orbax (dozens per checkpoint) from absl's log; warnings stay."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.converter.ABSL_TO_STANDARD[logging.WARNING] or (
        "orbax" not in record.pathname)


COMPILATION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxlm", "xla")


def use_compilation_cache() -> None:
  """JAX's persistent compilation cache in `COMPILATION_CACHE`, so a resumed run, an eval or a
  second run of the same shapes loads its compiled steps instead of compiling them again (the
  cache is keyed by program, flags, devices and jax version, so a hit is the same executable).
  A cache the user chose (`JAX_COMPILATION_CACHE_DIR`) is kept; `JAXLM_COMPILATION_CACHE=0`
  turns jaxlm's off."""
  import jax

  if os.environ.get("JAXLM_COMPILATION_CACHE") == "0" or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> int:
  """Runs `main` under absl (on `argv`, default sys.argv); a UserError exits 1 with its message
  and no traceback. Started as `python -m jaxlm.<verb>`, the process first restarts itself once
  with malloc on huge pages (`huge_pages.py`)."""
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if main_spec is not None and main_spec.name.startswith("jaxlm."):
    huge_pages.reexec_with_huge_pages()

  def guarded(argv):
    logging.get_absl_handler().addFilter(_QuietLibraries())
    use_compilation_cache()
    try:
      main(argv)
    except UserError as e:
      logging.flush()
      print(f"Error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(guarded, argv=argv, flags_parser=_parse_flags)
  return 0
