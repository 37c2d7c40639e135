"""Checks of the resolved config that need more than one key, made before any compute."""

import ml_collections

from jaxlm.errors import UserError

DECAYS = ("linear", "cosine", "constant", "trapezoid")  # Learning-rate decays after warm-up.
# train.prng_impl -> the name jax.random gives the implementation of the dropout key.
PRNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def validate(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
  """Raises UserError with one clear message for the first impossible setting found."""
  t, d, m, o = config.train, config.data, config.model, config.optimizer
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "max_consecutive_skips", "microbatches"):
    if t[key] <= 0:
      raise UserError(f"train.{key} is {t[key]}; it must be a positive integer.")
  if t.seed < 0:
    raise UserError(f"train.seed is {t.seed}; it must be >= 0.")
  validate_trainer_options(t)
  for name, value in config.seeds.items():
    if value < -1:
      raise UserError(f"seeds.{name} is {value}; use a seed >= 0, or -1 to derive it from "
                      "train.seed.")
  if d.seq_len < 8:
    raise UserError(f"data.seq_len is {d.seq_len}; it must be at least 8.")
  if d.seq_len > m.max_position and m.position_encoding == "absolute":
    raise UserError(
        f"data.seq_len ({d.seq_len}) exceeds model.max_position ({m.max_position}): positions past "
        "the table have no embedding. Lower data.seq_len or raise model.max_position."
    )
  if d.batch_size <= 0 or d.batch_size % process_count:
    raise UserError(
        f"data.batch_size ({d.batch_size}) must be positive and divisible by the "
        f"{process_count} processes."
    )
  validate_batch_ramp(config, process_count)
  if d.pack_examples < 1 or (d.pack_examples > 1 and d.format != "pairs"):
    raise UserError(f"data.pack_examples is {d.pack_examples}: use 1 (one example per row) or "
                    "more with data.format=pairs (the other formats leave little padding).")
  if not 0.0 <= d.short_seq_prob <= 1.0 or not 0.0 < d.eval_fraction < 1.0:
    raise UserError("data.short_seq_prob must be in [0, 1] and data.eval_fraction in (0, 1).")
  if d.eval_examples < 1:
    raise UserError(f"data.eval_examples is {d.eval_examples}; it must be at least 1.")
  if d.workers < 0:
    raise UserError(f"data.workers is {d.workers}; use 0 (a background thread) or more processes.")
  if d.eval_seed < 0:
    raise UserError(f"data.eval_seed is {d.eval_seed}; it must be >= 0.")
  if m.hidden_size % m.num_heads:
    raise UserError(
        f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_heads ({m.num_heads})."
    )
  if o.decay not in DECAYS:
    raise UserError(f"optimizer.decay is '{o.decay}'; use one of {DECAYS}.")
  if o.learning_rate <= 0 or o.warmup_steps < 0:
    raise UserError("optimizer.learning_rate must be positive and optimizer.warmup_steps >= 0.")


def validate_batch_ramp(config: ml_collections.ConfigDict, process_count: int = 1) -> None:
  """`train.batch_ramp_steps` and `train.batch_ramp_start` (the mesh's part of the check, that
  the first batch splits over the data-parallel devices, is `trainer.make_mesh`'s)."""
  t, d = config.train, config.data
  steps, first = t.batch_ramp_steps, t.batch_ramp_start
  if steps < 0 or first < 0:
    raise UserError(f"train.batch_ramp_steps ({steps}) and train.batch_ramp_start ({first}) "
                    "must be >= 0 (0 = no ramp).")
  if steps == 0:
    if first:
      raise UserError(f"train.batch_ramp_start is {first} but train.batch_ramp_steps is 0 (no "
                      "ramp): set train.batch_ramp_steps to ramp the batch, or "
                      "train.batch_ramp_start=0.")
    return
  if first == 0 or d.batch_size % first:
    raise UserError(f"train.batch_ramp_start ({first}) must be a positive divisor of "
                    f"data.batch_size ({d.batch_size}): the ramp's batches are its multiples up "
                    f"to data.batch_size, e.g. {d.batch_size // 4 or 1}.")
  if first % process_count:
    raise UserError(f"train.batch_ramp_start ({first}) must be divisible by the "
                    f"{process_count} processes, so that every ramp batch splits over them.")
  stages = d.batch_size // first
  if steps < stages:
    raise UserError(f"train.batch_ramp_steps ({steps}) is shorter than the ramp's {stages} "
                    f"stages (data.batch_size / train.batch_ramp_start): every stage needs a "
                    f"step. Use at least {stages} steps or a larger train.batch_ramp_start.")


def recipe_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """Settings that run but silently change the recipe a researcher asked for, one line each.

  Warnings, not errors: a short smoke run of a long recipe (`--config.train.steps=30`) trips
  them on purpose. The loop logs them at start; `tests/test_recipes.py` holds every experiment
  to none.
  """
  t, o, d = config.train, config.optimizer, config.data
  found = []
  if o.warmup_steps >= t.steps:
    found.append(
        f"optimizer.warmup_steps ({o.warmup_steps}) >= train.steps ({t.steps}): the learning "
        f"rate never reaches its peak {o.learning_rate:g} and its decay never starts.")
  if t.get("batch_ramp_steps", 0) >= t.steps:  # Fine-tuning configs have no ramp keys.
    found.append(
        f"train.batch_ramp_steps ({t.batch_ramp_steps}) >= train.steps ({t.steps}): the run "
        "ends inside the batch-size ramp.")
  mlm = config.get("objectives", {}).get("mlm")
  if mlm is not None and mlm.weight > 0 and mlm.max_predictions_per_seq != -1:
    wanted = mlm.mask_rate * d.seq_len
    if mlm.max_predictions_per_seq < 0.9 * wanted:
      found.append(
          f"objectives.mlm.max_predictions_per_seq ({mlm.max_predictions_per_seq}) caps MLM at "
          f"{mlm.max_predictions_per_seq / d.seq_len:.1%} of {d.seq_len} tokens, not mask_rate "
          f"{mlm.mask_rate:.0%}; set it to -1 to derive it from the rate.")
  return found


def resume_warnings(config: ml_collections.ConfigDict, previous_steps: int | None) -> list[str]:
  """A resumed run whose `train.steps` changed: the schedule stretches or shrinks under it."""
  steps = config.train.steps
  if previous_steps is None or previous_steps == steps or config.optimizer.decay == "constant":
    return []
  return [f"train.steps is {steps}, the run started with {previous_steps}: the "
          f"{config.optimizer.decay} learning-rate decay now spans a different length, so the "
          "rate jumps at the resumed step. Keep train.steps to resume the same recipe."]


def resolved_seeds(config: ml_collections.ConfigDict) -> dict[str, int]:
  """`seeds.init`, `seeds.data` and `seeds.dropout`, with -1 replaced by `train.seed`."""
  return {name: config.train.seed if value == -1 else int(value)
          for name, value in config.seeds.items()}


def validate_trainer_options(train: ml_collections.ConfigDict) -> None:
  """`train.prng_impl` and `train.profile_steps`, read by the trainer of pretraining and
  fine-tuning alike."""
  if train.prng_impl not in PRNG_IMPLS:
    raise UserError(f"train.prng_impl is '{train.prng_impl}'; use one of {tuple(PRNG_IMPLS)}.")
  profile_range(train)


def profile_range(train: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`train.profile_steps` "A,B" as `(A, B)`, the first and last step traced (counted from 1,
  as logged); None for "" (no trace)."""
  value = str(train.profile_steps).strip()
  if not value:
    return None
  usage = (f"train.profile_steps is '{value}'; use \"A,B\" with 1 <= A <= B <= train.steps "
           f"({train.steps}), e.g. \"10,12\", or \"\" for no trace.")
  parts = value.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise UserError(usage)
  first, last = (int(p) for p in parts)
  if not 1 <= first <= last <= train.steps:
    raise UserError(usage)
  return first, last
