"""Hugging Face export of the modern encoder as `ModernBertForMaskedLM`: transformers computes
jaxlm's logits (eager and sdpa attention, padded or not), the tokenizer gives jaxlm's ids without
token types, jaxlm -> HF -> jaxlm is exact, and every option ModernBert cannot compute is refused
with the value that would export. tests/test_hf.py covers BERT and RoBERTa-PreLayerNorm."""

import dataclasses
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TOKENIZER_VOCAB, experiment_config
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead
from jaxlm.models.attention import rotary
from jaxlm.models.heads import LmHead

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxlm import export  # noqa: E402  (after the guard: it needs the hf extra)
from jaxlm.hf import convert, tokenizer as hf_tokenizer  # noqa: E402
from test_hf import (PAIRS, TEXTS, TOLERANCE, _hf_batch, _init, _jaxlm_batch,  # noqa: E402
                     assert_exact_round_trip)

# ModernBERT's layout with jaxlm's test sizes. An odd theta, eps and dropout rates, so that each
# has to be carried over; weights ten times BERT's scale and every norm scale and bias moved
# away from 1 and 0 by test_hf's `_init`, so that a misplaced tensor shows far past TOLERANCE.
MODERN = ModelConfig(
    vocab_size=TOKENIZER_VOCAB, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=96,
    max_position=96, type_vocab_size=0, dropout_rate=0.15, attention_dropout_rate=0.05,
    pre_layer_norm=True, first_layer_attention_norm=False, layer_norm_eps=1e-6,
    initializer_range=0.2, position_encoding="rope", rope_theta=500.0, mlp_activation="geglu")
# Both gated MLPs, biases on and off, tied and untied outputs; the second also has a CLM head,
# which ModernBert has no place for.
VARIANTS = {
    "geglu_bias_tied": (MODERN, (("mlm", MlmHead), ("nsp", NspHead))),
    "swiglu_nobias_untied": (
        dataclasses.replace(MODERN, mlp_activation="swiglu", use_bias=False,
                            tie_output_embedding=False),
        (("mlm", MlmHead), ("nsp", NspHead), ("clm", LmHead))),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory, tokenizer):
  config, heads = VARIANTS[request.param]
  model, params = _init(config, heads)
  directory = tmp_path_factory.mktemp(request.param)
  result = convert.save_hf(str(directory), params, config)
  assert hf_tokenizer.export_tokenizer(tokenizer, str(directory), config.max_position,
                                       token_types=False) == []
  return config, model, params, directory, result


def _hf_logits(hf_model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy((ids != 0).astype(np.int64))).logits.numpy()


def test_transformers_computes_jaxlm_logits(exported, tokenizer):
  config, model, params, directory, result = exported
  assert result.architecture == "ModernBertForMaskedLM" and result.lm_head == "mlm"
  with open(os.path.join(directory, "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["model_type"] == "modernbert"
  assert hf_config["layer_types"] == ["full_attention"] * config.num_layers
  assert hf_config["rope_parameters"]["full_attention"]["rope_theta"] == config.rope_theta
  assert hf_config["hidden_activation"] == {"geglu": "gelu", "swiglu": "silu"}[
      config.mlp_activation]
  assert hf_config["classifier_activation"] == "gelu"  # The exact GELU, as jaxlm's.
  for flag in ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias", "decoder_bias"):
    assert hf_config[flag] == config.use_bias, flag
  assert hf_config["tie_word_embeddings"] == config.tie_output_embedding
  assert hf_config["norm_eps"] == config.layer_norm_eps
  assert hf_config["max_position_embeddings"] == config.max_position
  assert (hf_config["pad_token_id"], hf_config["cls_token_id"], hf_config["sep_token_id"]) == (
      tokenizer_lib.PAD_ID, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID)
  expected_extra = {"encoder/pooler/kernel", "nsp/classifier/kernel"}
  if config.use_bias:
    expected_extra |= {"encoder/pooler/bias", "nsp/classifier/bias"}
  else:  # The variant without biases also has a CLM head (no transform bias, no LayerNorm bias).
    expected_extra |= {"clm/transform/kernel", "clm/layer_norm/scale", "clm/output_embedding"}
  assert set(result.extra) == expected_extra

  # The exported tokenizer: jaxlm's ids, no token types (the model has no table for them).
  batch = _jaxlm_batch(tokenizer)
  hf_batch = _hf_batch(directory)
  assert set(hf_batch) == {"input_ids", "attention_mask"}
  np.testing.assert_array_equal(hf_batch["input_ids"], batch["input_ids"])
  ids = batch["input_ids"]
  real = ids != tokenizer_lib.PAD_ID
  assert (~real).any(), "the batch should hold padding"
  ours = np.asarray(model.apply({"params": params}, batch, deterministic=True)["mlm"])
  assert np.abs(ours[real]).max() > 1.0  # Logits far from trivial.
  for implementation in ("eager", "sdpa"):
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        directory, output_loading_info=True, attn_implementation=implementation)
    assert type(hf_model).__name__ == result.architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    hf_model.eval()
    error = np.abs(_hf_logits(hf_model, ids) - ours)[real].max()
    print(f"ModernBertForMaskedLM ({config.mlp_activation}, {implementation}): MLM max |logit "
          f"difference| {error:.2e}")
    assert error < TOLERANCE
  # One text at a time, without padding: the same logits (padding changes nothing on either
  # side), rows of the pairs (whose token types jaxlm ignores too) included.
  for row in range(len(ids)):
    alone = ids[row:row + 1, :real[row].sum()]
    error = np.abs(_hf_logits(hf_model, alone)[0] - ours[row, :alone.shape[1]]).max()
    assert error < TOLERANCE, (TEXTS + [a for a, _ in PAIRS])[row]


def test_import_round_trip_is_exact(exported):
  directory = exported[3]
  imported = assert_exact_round_trip(exported)
  assert "attention_norm" not in imported["encoder"]["layer_0"]
  with pytest.raises(UserError, match="first_layer_attention_norm.*scan_layers"):
    convert.import_hf(str(directory), scan_layers=True)


def test_rotary_layout_is_transformers_rotary():
  """jaxlm's `rotary` is ModernBert's rotate-half RoPE, positions and theta alike."""
  from transformers.models.modernbert import modeling_modernbert as hf

  config = convert.hf_config(MODERN, convert.MODERNBERT, "ModernBertModel")
  rng = np.random.default_rng(0)
  x_BLHK = rng.normal(size=(2, 7, 4, MODERN.head_dim)).astype(np.float32)
  positions_BL = np.stack([np.arange(7), np.arange(7) * 5 + 3])
  ours = np.asarray(rotary(jnp.asarray(x_BLHK), jnp.asarray(positions_BL), MODERN.rope_theta))
  x = torch.from_numpy(x_BLHK).transpose(1, 2)  # HF's [B, H, L, K].
  cos, sin = hf.ModernBertRotaryEmbedding(config)(x, torch.from_numpy(positions_BL),
                                                  "full_attention")
  theirs, _ = hf.apply_rotary_pos_emb(x, x, cos, sin)
  np.testing.assert_allclose(theirs.transpose(1, 2).numpy(), ours, atol=2e-5)


def test_export_writes_a_modernbert_folder(tokenizer, tmp_path):
  """`python -m jaxlm.export`'s work on a loaded run (faked, as in test_hf): the architecture
  and a tokenizer without token types."""
  config, heads = VARIANTS["geglu_bias_tied"]
  model, params = _init(config, heads)
  loaded = types.SimpleNamespace(
      config=experiment_config("bert_tiny"), model_config=config, model=model, params=params,
      tokenizer=tokenizer, step=3, objectives=[types.SimpleNamespace(name="mlm")])
  metadata = export.write_export(str(tmp_path), loaded)
  assert metadata["architecture"] == "ModernBertForMaskedLM"
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  encoded = hf(TEXTS[1], PAIRS[0][1])
  assert "token_type_ids" not in encoded
  assert encoded["input_ids"] == hf_tokenizer.jaxlm_ids(tokenizer, TEXTS[1], PAIRS[0][1])


# Each option ModernBert cannot compute, set alone on an exportable config: the UserError names
# the option and the value that would export.
@pytest.mark.parametrize("key, value, wanted", [
    ("pre_layer_norm", False, "model.pre_layer_norm=True"),
    ("first_layer_attention_norm", True, "model.first_layer_attention_norm=False"),
    ("type_vocab_size", 2, "model.type_vocab_size=0"),
    ("mlp_activation", "gelu", "model.mlp_activation='geglu' or 'swiglu'"),
    ("norm", "rms_norm", "model.norm='layer_norm'"),
    ("mlm_head_transform", False, "model.mlm_head_transform=True"),
    ("position_encoding", "relative", "model.position_encoding=absolute"),
])
def test_export_refuses_what_modernbert_cannot_compute(key, value, wanted):
  config = dataclasses.replace(MODERN, **{key: value})
  with pytest.raises(UserError, match=f"model.{key} is") as error:
    convert.check_exportable(config)
  assert wanted in str(error.value)


def test_modernbert_refusals_are_named_together():
  config = dataclasses.replace(MODERN, type_vocab_size=2, norm="rms_norm")
  with pytest.raises(UserError, match="type_vocab_size=0.*model.norm='layer_norm'"):
    convert.check_exportable(config)


@pytest.mark.parametrize("overrides, option", [
    (dict(type_vocab_size=0), "model.type_vocab_size is 0"),
    (dict(pre_layer_norm=True, first_layer_attention_norm=False),
     "model.first_layer_attention_norm is False"),
    (dict(mlp_activation="geglu"), "model.mlp_activation is 'geglu'"),
])
def test_bert_export_refuses_the_modernbert_layout_with_absolute_positions(overrides, option):
  """With absolute positions the target is BERT / RoBERTa-PreLayerNorm, which always add a
  token-type embedding and normalise before every layer; the message points to rope."""
  config = dataclasses.replace(MODERN, position_encoding="absolute", mlp_activation="gelu",
                               type_vocab_size=2, first_layer_attention_norm=True,
                               pre_layer_norm=False)
  convert.check_exportable(config)  # BERT's layer exports.
  with pytest.raises(UserError, match=option) as error:
    convert.check_exportable(dataclasses.replace(config, **overrides))
  assert "position_encoding='rope'" in str(error.value)


def _modernbert_hf_config(**overrides):
  """A config.json as transformers writes an exportable ModernBert, with `overrides`."""
  config = convert.hf_config(MODERN, convert.MODERNBERT, "ModernBertForMaskedLM").to_dict()
  return {**config, **overrides}


@pytest.mark.parametrize("overrides, option", [
    # ModernBERT-base's own layout: a sliding window every third layer with another theta.
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_attention"),
    # ModernBERT-base's biases: only the decoder's.
    (dict(attention_bias=False, mlp_bias=False, norm_bias=False, classifier_bias=False,
          decoder_bias=True), "bias flags"),
    (dict(hidden_activation="gelu_new"), "hidden_activation"),
    (dict(classifier_activation="silu"), "classifier_activation"),
])
def test_import_refuses_what_jaxlm_does_not_compute(overrides, option):
  assert convert.model_overrides(_modernbert_hf_config())["position_encoding"] == "rope"
  with pytest.raises(UserError, match=option):
    convert.model_overrides(_modernbert_hf_config(**overrides))


def test_import_reads_transformers_4_config_keys():
  """transformers 4.x wrote `global_rope_theta` and `global_attn_every_n_layers`."""
  config = _modernbert_hf_config(global_attn_every_n_layers=1, global_rope_theta=250.0)
  del config["layer_types"], config["rope_parameters"]
  assert convert.model_overrides(config)["rope_theta"] == 250.0
  with pytest.raises(UserError, match="sliding_attention"):
    convert.model_overrides({**config, "global_attn_every_n_layers": 3})
