"""Hugging Face export and import: transformers computes jaxlm's logits from the export, the
exported tokenizer gives jaxlm's ids, jaxlm -> HF -> jaxlm is exact, and what has no counterpart
is refused with the option named."""

import json
import os
import types
import unicodedata

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import experiment_config, sentences_of
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.models.heads import LmHead, PlmHead

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxlm import export  # noqa: E402  (after the guard: it needs the hf extra)
from jaxlm.hf import convert, tokenizer as hf_tokenizer  # noqa: E402

TOLERANCE = 1e-3
# Accents, digits, punctuation, scripts and symbols the corpus never shows, repeated and odd
# spaces, control characters, literal special tokens, the empty text.
TEXTS = [
    "The model learns from text.",
    "Café crème, naïve résumé: déjà vu!",
    "In 2024, 3.14159 x 42 = 131.95 (approx.) -- see §7.",
    "未知の文字 and emoji 🤖 ⊗∰",
    "  spaces   everywhere\there  ",
    "A [MASK] in the text stays text; so does [CLS].",
    "line\nbreak, nul\x00 and bell\x07 characters",
    "",
]
PAIRS = [("The first segment.", "And the second one, with 7 digits 1234567."),
         ("Ünïcödé ß", "ＦＵＬＬＷＩＤＴＨ ﬁ")]
# For the tokenizer alone: decomposed accents (NFD), stacked diacritics, compatibility forms.
MORE_TEXTS = [
    unicodedata.normalize("NFD", "Ça déjà été créé à Noël, naïve façon"),
    "Tiếng Việt: ắ ằ ẳ ẵ ặ ố ồ ổ ỗ ộ",
    "Ελληνικά άέήίόύώ ΐΰ, Русский йёЁЙ, 한국어 ㄱㄴ, ｶﾞｷﾞ ﾊﾟ",
    "ﬁnance ﬂow ﬀ x² ½ ™ ℃ № ①",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "   ",
]


def _config(pre_layer_norm: bool, **overrides) -> ModelConfig:
  # Weights ten times BERT's scale, so that a wrongly mapped tensor moves the logits far past
  # the tolerance; an odd layer_norm_eps, so that it has to be carried over.
  values = dict(vocab_size=600, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                max_position=96, type_vocab_size=2, pre_layer_norm=pre_layer_norm,
                layer_norm_eps=1e-6, initializer_range=0.2)
  return ModelConfig(**{**values, **overrides})


def _init(config: ModelConfig, heads, seed: int = 0):
  """The model and random, non-trivial parameters of its shapes: weights ten times BERT's scale
  (a wrongly mapped tensor moves the logits far past the tolerance), every LayerNorm scale and
  every bias moved away from 1 and 0 (a swapped scale and bias, or two swapped norms, change the
  function). Drawn with numpy from `eval_shape`: no initialiser is compiled."""
  views = tuple((name, {"clm": "causal", "plm": "permuted"}[name]) for name, _ in heads
                if name in ("clm", "plm"))
  model = Pretrainer(config, heads=heads, views=views)
  batch = {"input_ids": np.full((1, 8), 5, np.int32), "token_type_ids": np.zeros((1, 8), np.int32),
           "mlm_positions": np.zeros((1, 2), np.int32)}
  if views:
    batch.update(plm_perm=np.arange(8, dtype=np.int32)[None],
                 plm_target_weights=np.ones((1, 2), np.float32))
  shapes = jax.eval_shape(lambda r: model.init({"params": r}, batch, deterministic=True),
                          jax.random.key(0))
  leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes)["params"])
  rng = np.random.default_rng(seed)
  values = []
  for path, leaf in leaves:
    name = path[-1].key
    noise = rng.normal(0.0, 0.3 if name in ("scale", "bias") else 0.2, leaf.shape)
    values.append((noise + (name == "scale")).astype(np.float32))
  return model, jax.tree_util.tree_unflatten(tree, values)


def _jaxlm_batch(tokenizer):
  """TEXTS and PAIRS as jaxlm encodes them, padded; logits are asked for at every position."""
  rows = [hf_tokenizer.jaxlm_ids(tokenizer, t) for t in TEXTS]
  rows += [hf_tokenizer.jaxlm_ids(tokenizer, a, b) for a, b in PAIRS]
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int32)
  types_ = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    if i >= len(TEXTS):
      types_[i, row.index(tokenizer_lib.SEP_ID) + 1:len(row)] = 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape)
  return {"input_ids": ids, "token_type_ids": types_, "mlm_positions": positions}


def _hf_batch(directory):
  hf = transformers.AutoTokenizer.from_pretrained(directory)
  single = hf(TEXTS, padding="longest", return_tensors="np")
  pair = hf([a for a, _ in PAIRS], [b for _, b in PAIRS], padding="longest", return_tensors="np")
  length = max(single["input_ids"].shape[1], pair["input_ids"].shape[1])
  return {k: np.concatenate([np.pad(e[k], ((0, 0), (0, length - e[k].shape[1])))
                             for e in (single, pair)]) for k in single}


def _export(directory, params, config, tokenizer) -> convert.Exported:
  exported = convert.save_hf(str(directory), params, config)
  assert hf_tokenizer.export_tokenizer(tokenizer, str(directory), config.max_position) == []
  return exported


@pytest.fixture(scope="module", params=["post_ln", "pre_ln"])
def exported(request, tmp_path_factory, tokenizer):
  config = _config(pre_layer_norm=request.param == "pre_ln")
  model, params = _init(config, (("mlm", MlmHead), ("nsp", NspHead)))
  directory = tmp_path_factory.mktemp(request.param)
  return config, model, params, directory, _export(directory, params, config, tokenizer)


def test_transformers_computes_jaxlm_logits(exported, tokenizer):
  config, model, params, directory, result = exported
  if config.pre_layer_norm:
    assert result.architecture == "RobertaPreLayerNormForMaskedLM"
    auto, expected_positions = transformers.AutoModelForMaskedLM, config.max_position + 1
  else:
    assert result.architecture == "BertForPreTraining"
    auto, expected_positions = transformers.AutoModelForPreTraining, config.max_position
  hf_model, info = auto.from_pretrained(directory, output_loading_info=True)
  assert type(hf_model).__name__ == result.architecture
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"] and not info["error_msgs"]
  with open(os.path.join(directory, "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["architectures"] == [result.architecture]
  assert hf_config["hidden_act"] == "gelu"  # The exact GELU, as jaxlm's.
  assert hf_config["layer_norm_eps"] == config.layer_norm_eps
  assert hf_config["max_position_embeddings"] == expected_positions
  assert hf_config["vocab_size"] == config.vocab_size and hf_config["pad_token_id"] == 0
  assert hf_config["type_vocab_size"] == config.type_vocab_size

  batch = _jaxlm_batch(tokenizer)
  hf_batch = _hf_batch(directory)
  np.testing.assert_array_equal(hf_batch["input_ids"], batch["input_ids"])
  np.testing.assert_array_equal(hf_batch["token_type_ids"], batch["token_type_ids"])
  assert (batch["input_ids"] == 0).any(), "the batch should hold padding"
  ours = model.apply({"params": params}, batch, deterministic=True)
  hf_model.eval()
  with torch.no_grad():
    theirs = hf_model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in hf_batch.items()})
  real = hf_batch["attention_mask"].astype(bool)
  logits = theirs.prediction_logits if hasattr(theirs, "prediction_logits") else theirs.logits
  mlm_error = np.abs(logits.numpy() - np.asarray(ours["mlm"]))[real].max()
  print(f"{result.architecture}: MLM max |logit difference| {mlm_error:.2e}")
  assert mlm_error < TOLERANCE
  assert np.abs(np.asarray(ours["mlm"])[real]).max() > 1.0  # Logits far from trivial.
  if not config.pre_layer_norm:
    nsp_error = np.abs(theirs.seq_relationship_logits.numpy() - np.asarray(ours["nsp"])).max()
    print(f"{result.architecture}: NSP max |logit difference| {nsp_error:.2e}")
    assert nsp_error < TOLERANCE
  else:  # RoBERTa has no NSP head nor (in a masked LM) a pooler: they are kept beside it.
    assert sorted(result.extra) == ["encoder/pooler/bias", "encoder/pooler/kernel",
                                    "nsp/classifier/bias", "nsp/classifier/kernel"]


def assert_exact_round_trip(exported):
  """`import_hf` of an exported folder gives back the run's config and every array, to the bit;
  returns the imported tree."""
  config, _, params, directory, _ = exported
  overrides, imported = convert.import_hf(str(directory))
  assert ModelConfig(**overrides) == config
  ours, theirs = convert.flatten(params), convert.flatten(imported)
  assert set(ours) == set(theirs)
  for path, array in ours.items():
    np.testing.assert_array_equal(theirs[path], array, err_msg="/".join(path))
  return imported


def test_import_round_trip_is_exact(exported):
  imported = assert_exact_round_trip(exported)
  params = exported[2]
  assert jax.tree_util.tree_structure(imported) == jax.tree_util.tree_structure(params)


def test_scanned_layers_round_trip(tmp_path):
  config = _config(pre_layer_norm=True, scan_layers=True, num_layers=3)
  _, params = _init(config, (("mlm", MlmHead),))
  assert params["encoder"]["layers"]["layer"]["mlp"]["wi"]["kernel"].shape == (3, 64, 128)
  convert.save_hf(str(tmp_path), params, config)
  _, imported = convert.import_hf(str(tmp_path), scan_layers=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, imported, params)
  _, per_layer = convert.import_hf(str(tmp_path))
  np.testing.assert_array_equal(per_layer["encoder"]["layer_2"]["mlp"]["wi"]["kernel"],
                                params["encoder"]["layers"]["layer"]["mlp"]["wi"]["kernel"][2])


def test_causal_lm_exports_as_a_decoder(tmp_path):
  """A CLM-only run becomes BertLMHeadModel with `is_decoder`: transformers then attends
  causally, as jaxlm's causal view."""
  config = _config(pre_layer_norm=False)
  model, params = _init(config, (("clm", LmHead),))
  result = convert.save_hf(str(tmp_path), params, config)
  assert result.architecture == "BertLMHeadModel" and result.lm_head == "clm"
  hf_model, info = transformers.BertLMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids = np.random.default_rng(0).integers(5, config.vocab_size, (2, 12)).astype(np.int32)
  ids[1, 8:] = tokenizer_lib.PAD_ID
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
  ours = np.asarray(model.apply({"params": params}, batch, deterministic=True)["clm"])
  with torch.no_grad():
    theirs = hf_model.eval()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy((ids != 0).astype(np.int64))).logits
  assert np.abs(theirs.numpy() - ours)[ids != 0].max() < TOLERANCE
  _, imported = convert.import_hf(str(tmp_path))
  assert set(imported) == {"encoder", "clm"}
  np.testing.assert_array_equal(imported["encoder"]["pooler"]["kernel"],
                                params["encoder"]["pooler"]["kernel"])  # Kept beside it.


def test_plm_only_exports_the_encoder(tmp_path):
  config = _config(pre_layer_norm=False)
  _, params = _init(config, (("plm", PlmHead),))
  result = convert.to_hf(params, config)
  assert result.architecture == "BertModel" and result.lm_head is None
  assert "encoder/query_start" in result.extra and "plm/transform/kernel" in result.extra
  assert "pooler.dense.weight" in result.state  # A bare base model: keys without a prefix.


def test_tokenizer_gives_jaxlm_ids(tokenizer, tmp_path, corpus_documents):
  bpe = tokenizer_lib.train(sentences_of(corpus_documents), str(tmp_path / "bpe.model"),
                            vocab_size=400, model_type="bpe", max_sentences=2000)
  for name, jaxlm_tokenizer in (("unigram", tokenizer), ("bpe", bpe)):
    directory = tmp_path / name
    assert hf_tokenizer.export_tokenizer(jaxlm_tokenizer, str(directory), 128) == []
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id,
            hf.mask_token_id) == (0, 1, 2, 3, 4)
    for text in TEXTS + MORE_TEXTS:
      assert hf(text)["input_ids"] == hf_tokenizer.jaxlm_ids(jaxlm_tokenizer, text), (name, text)
    for a, b in PAIRS + [(TEXTS[1], TEXTS[3]), (TEXTS[5], TEXTS[6])]:
      encoded = hf(a, b)
      want = hf_tokenizer.jaxlm_ids(jaxlm_tokenizer, a, b)
      assert encoded["input_ids"] == want, (name, a, b)
      first_sep = want.index(tokenizer_lib.SEP_ID)
      assert encoded["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(want) - first_sep - 1)
    # A fill-mask prompt can still ask for the special token.
    assert tokenizer_lib.MASK_ID in hf("a [MASK] b", split_special_tokens=False)["input_ids"]
    assert hf_tokenizer.import_tokenizer(str(directory)) == str(directory / "tokenizer.model")


def test_import_of_a_folder_without_pooler_overlays_a_fresh_init(tmp_path, tokenizer):
  """A BertForMaskedLM from elsewhere has no pooler and no NSP head: they keep their init."""
  config = _config(pre_layer_norm=False)
  _, params = _init(config, (("mlm", MlmHead),))
  convert.save_hf(str(tmp_path), params, config)
  os.remove(tmp_path / convert.EXTRA_FILE)  # As a folder not written by jaxlm.
  _, imported = convert.import_hf(str(tmp_path))
  assert "pooler" not in imported["encoder"] and set(imported) == {"encoder", "mlm"}
  _, fresh = _init(config, (("mlm", MlmHead), ("nsp", NspHead)), seed=1)
  merged = convert.overlay(fresh, imported)
  assert merged.kept == ["encoder/pooler/bias", "encoder/pooler/kernel", "nsp/classifier/bias",
                         "nsp/classifier/kernel"] and merged.dropped == []
  np.testing.assert_array_equal(merged.params["mlm"]["bias"], params["mlm"]["bias"])
  np.testing.assert_array_equal(merged.params["nsp"]["classifier"]["bias"],
                                fresh["nsp"]["classifier"]["bias"])
  # A run without the MLM objective drops that head; a model of other sizes is refused.
  assert convert.overlay(_init(config, (("nsp", NspHead),))[1], imported).dropped == ["mlm"]
  with pytest.raises(UserError, match="shape"):
    convert.overlay(_init(_config(False, hidden_size=32), (("mlm", MlmHead),))[1], imported)
  with pytest.raises(UserError, match="scan_layers"):
    convert.overlay(_init(_config(False, scan_layers=True), (("mlm", MlmHead),))[1], imported)


def test_relative_positions_are_refused():
  config = _config(pre_layer_norm=False, position_encoding="relative")
  with pytest.raises(UserError, match="model.position_encoding=absolute"):
    convert.to_hf({}, config)
  with pytest.raises(UserError, match="model.num_heads"):
    convert.check_exportable(_config(pre_layer_norm=False, num_heads=5))
  for bad, option in (({"hidden_act": "gelu_new"}, "hidden_act"),
                      ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                      ({"model_type": "gpt2"}, "gpt2")):
    hf_config = {"model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 8, **bad}
    with pytest.raises(UserError, match=option):
      convert.model_overrides(hf_config)


def test_export_writes_a_complete_folder(exported, tokenizer, tmp_path, monkeypatch):
  """`python -m jaxlm.export`'s work on a loaded run. Reading the run is faked (a run folder
  costs a compiled train-state init); `test_predict` covers `pretrained.load`."""
  config, model, params, _, _ = exported
  run_config = experiment_config("bert_tiny")
  loaded = types.SimpleNamespace(
      config=run_config, model_config=config, model=model, params=params, tokenizer=tokenizer,
      step=7, objectives=[types.SimpleNamespace(name="mlm"), types.SimpleNamespace(name="nsp")])
  from jaxlm.training import pretrained

  monkeypatch.setattr(pretrained, "read_config", lambda workdir: run_config)
  monkeypatch.setattr(pretrained, "load", lambda workdir, step=None: loaded)
  output = tmp_path / "out"
  metadata = export.export_run("runs/x", str(output))
  assert metadata["jaxlm_step"] == 7 and metadata["config"]["data"]["format"] == "pairs"
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "README.md",
          export.METADATA_FILE} <= set(os.listdir(output))
  assert (convert.EXTRA_FILE in os.listdir(output)) == config.pre_layer_norm
  _, info = getattr(transformers, metadata["architecture"]).from_pretrained(
      output, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  with pytest.raises(UserError, match="--overwrite"):
    export.export_run("runs/x", str(output))
  assert export.export_run("runs/x", str(output), overwrite=True)["jaxlm_step"] == 7
