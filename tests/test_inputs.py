"""What a run trains and evaluates on (`jaxlm.training.inputs`): the fixed eval set, formats."""

import os

import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.training import inputs
from conftest import experiment_config


def _config(repo_root, prepared, **changes):
  config = experiment_config("bert_tiny")
  config.data.train_files = prepared.directory
  config.data.eval_examples = 100
  config.model.vocab_size = 512
  for key, value in changes.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _eval_rows(config, workdir):
  _, _, _, evals = inputs.build_inputs(config, str(workdir), config.model.vocab_size)
  out = {}
  for name, (_, loader) in evals.items():
    batches = [loader.batch(k) for k in range(loader.steps)]
    out[name] = {key: np.concatenate([b[key] for b in batches])[:loader.num_examples]
                 for key in batches[0]}
  return out


def test_the_eval_set_depends_on_eval_seed_and_seq_len_only(repo_root, prepared_corpus, tmp_path):
  reference = _eval_rows(_config(repo_root, prepared_corpus), tmp_path / "a")
  assert set(reference) == {"windows", "pairs"}
  windows = reference["windows"]
  assert len(windows["input_ids"]) == 100 and windows["mlm_weights"].sum() > 100
  arms = [
      dict(train__seed=7),
      dict(data__batch_size=24),
      dict(objectives__nsp=dict(weight=0.0, random_next_prob=0.5), data__format="full_sentences"),
      dict(objectives__mlm=dict(weight=1.0, mask_rate=0.4, max_predictions_per_seq=30,
                                mask_token_prob=1.0, random_token_prob=0.0, whole_word=True),
           data__format="packed", objectives__nsp=dict(weight=0.0, random_next_prob=0.5)),
  ]
  for i, changes in enumerate(arms):
    arm = _eval_rows(_config(repo_root, prepared_corpus, **changes), tmp_path / str(i))
    for key, value in windows.items():
      np.testing.assert_array_equal(arm["windows"][key], value, err_msg=f"{changes} {key}")
    if "pairs" in arm:
      for key, value in reference["pairs"].items():
        np.testing.assert_array_equal(arm["pairs"][key], value, err_msg=f"{changes} {key}")
  other_seed = _eval_rows(_config(repo_root, prepared_corpus, data__eval_seed=5), tmp_path / "s")
  assert not np.array_equal(other_seed["windows"]["input_ids"], windows["input_ids"])


def test_eval_masking_has_its_own_options(repo_root, prepared_corpus, tmp_path):
  plain = _eval_rows(_config(repo_root, prepared_corpus), tmp_path / "a")["windows"]
  heavy = _eval_rows(_config(repo_root, prepared_corpus,
                             eval__mlm=dict(mask_rate=0.4, max_predictions_per_seq=-1,
                                            mask_token_prob=0.8, random_token_prob=0.1,
                                            whole_word=False)), tmp_path / "b")["windows"]
  assert heavy["mlm_weights"].sum() > 2 * plain["mlm_weights"].sum()


def test_nsp_needs_the_pairs_format(repo_root, prepared_corpus, tmp_path):
  config = _config(repo_root, prepared_corpus, data__format="packed")
  with pytest.raises(UserError, match="'nsp' trains on data.format pairs"):
    inputs.build_inputs(config, str(tmp_path), config.model.vocab_size)


@pytest.mark.parametrize("fmt", ["pairs", "full_sentences", "packed"])
def test_every_format_trains_mlm(repo_root, prepared_corpus, tmp_path, fmt):
  config = _config(repo_root, prepared_corpus, data__format=fmt)
  if fmt != "pairs":
    config.objectives.nsp.weight = 0.0
  _, objectives, train, _ = inputs.build_inputs(config, str(tmp_path), config.model.vocab_size)
  batch = train.batch(0)
  assert batch["input_ids"].shape == (config.data.batch_size, config.data.seq_len)
  assert batch["mlm_weights"].sum(1).min() >= 1
  assert ("next_sentence_label" in batch) == (fmt == "pairs")


def test_eval_files_are_prepared_with_the_training_tokenizer(repo_root, prepared_corpus,
                                                              corpus_documents, tmp_path):
  held_out = tmp_path / "held_out.txt"
  held_out.write_text("\n\n".join("\n".join(d) for d in corpus_documents[:3]) + "\n")
  config = _config(repo_root, prepared_corpus, data__eval_files=str(held_out))
  sources, _, _, evals = inputs.build_inputs(config, str(tmp_path / "w"), config.model.vocab_size)
  assert sources.eval.num_documents == 3
  assert (tmp_path / "w" / "prepared" / "eval" / "manifest.json").is_file()
  assert sources.fingerprint != prepared_corpus.fingerprint  # Both data sets are recorded.
  assert evals["windows"][1].num_examples > 0


def test_eval_data_with_another_tokenizer_is_refused(repo_root, prepared_corpus, tmp_path):
  other = _config(repo_root, prepared_corpus)
  other.data.train_files = ""  # The embedded corpus, with a tokenizer trained for this workdir.
  sources, _, _, _ = inputs.build_inputs(other, str(tmp_path / "other"), other.model.vocab_size)
  config = _config(repo_root, prepared_corpus,
                   data__eval_files=os.path.join(str(tmp_path / "other"), "prepared", "train"))
  with pytest.raises(UserError, match="another tokenizer"):
    inputs.build_inputs(config, str(tmp_path / "w"), config.model.vocab_size)
