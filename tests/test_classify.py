"""The classification objective and head: metrics by hand, the head inside the Pretrainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.models import EncoderOutput, ModelConfig, Pretrainer
from jaxlm.models.heads import ClassificationHead
from jaxlm.objectives import Classify, DataSpec, build_objectives

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=32)


def _loss(objective, logits, labels, weights):
  batch = {"labels": jnp.asarray(labels, jnp.int32),
           "label_weights": jnp.asarray(weights, jnp.float32)}
  loss, aux = objective.loss({"classify": jnp.asarray(logits, jnp.float32)}, batch)
  return float(loss), {k: (float(s), float(c)) for k, (s, c) in aux.items()}


def test_binary_loss_accuracy_and_f1_by_hand():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.2, 0.4], [3.0, -3.0], [9.0, 0.0]])
  labels = [0, 1, 1, 0, 1, 1]  # Predicted: 0, 1, 0, 1, 0, 0.
  weights = [1, 1, 1, 1, 1, 0]  # The last row is padding: wrong and confident, but ignored.
  loss, aux = _loss(Classify(2), logits, labels, weights)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = [-log_probs[k, y] for k, y in enumerate(labels)][:5]
  assert loss == pytest.approx(np.mean(nll), rel=1e-6)
  assert aux["classify_loss"][0] == pytest.approx(np.sum(nll), rel=1e-6)
  assert aux["classify_loss"][1] == 5
  assert aux["accuracy"] == (2.0, 5.0)  # Rows 0 and 1.
  # Class 1 over the real rows: TP = 1 (row 1), FP = 1 (row 3), FN = 2 (rows 2, 4).
  assert aux["f1"] == (2.0, 5.0)


def test_f1_adds_up_over_batches_to_the_corpus_f1():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(40, 2)), rng.integers(0, 2, 40)
  weights = (rng.random(40) < 0.8).astype(np.float32)
  objective = Classify(2)
  parts = [_loss(objective, logits[k:k + 8], labels[k:k + 8], weights[k:k + 8])[1]["f1"]
           for k in range(0, 40, 8)]
  predicted, real = logits.argmax(-1) == 1, weights > 0
  tp = np.sum(predicted & (labels == 1) & real)
  fp = np.sum(predicted & (labels == 0) & real)
  fn = np.sum(~predicted & (labels == 1) & real)
  total = np.sum(parts, axis=0)
  assert total[0] / total[1] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_more_classes_report_no_f1_and_need_two():
  loss, aux = _loss(Classify(3), [[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]], [2, 1], [1, 1])
  assert set(aux) == {"classify_loss", "accuracy"} and aux["accuracy"] == (1.0, 2.0)
  with pytest.raises(UserError, match="at least 2 classes"):
    Classify(1)


def test_an_all_padding_batch_is_finite():
  loss, aux = _loss(Classify(2), np.zeros((2, 2)), [0, 0], [0, 0])
  assert loss == 0.0 and aux["classify_loss"] == (0.0, 0.0) and aux["f1"] == (0.0, 0.0)


def test_not_in_the_pretraining_registry():
  data = DataSpec(vocab_size=128, seq_len=16, word_start=np.ones(128, bool))
  with pytest.raises(UserError, match="Unknown objective 'classify'"):
    build_objectives(ml_collections.ConfigDict({"classify": {"weight": 1.0}}), data)
  assert Classify.perplexity is False and Classify.name == "classify"


def _batch(rows=4, length=12, padding_rows=1):
  rng = np.random.default_rng(1)
  ids = rng.integers(5, CONFIG.vocab_size, (rows, length)).astype(np.int32)
  ids[:, 0], ids[:, 5], ids[:, 9], ids[:, 10:] = CLS_ID, SEP_ID, SEP_ID, PAD_ID
  types = np.zeros_like(ids)
  types[:, 6:10] = 1
  ids[rows - padding_rows:], types[rows - padding_rows:] = PAD_ID, 0
  weights = np.ones(rows, np.float32)
  weights[rows - padding_rows:] = 0
  return {"input_ids": ids, "token_type_ids": types,
          "labels": (np.arange(rows) % 3).astype(np.int32), "label_weights": weights}


def test_the_head_alone_names_its_parameters_and_drops_out():
  head = ClassificationHead(CONFIG, num_classes=3)
  pooled_BD = jnp.tanh(jax.random.normal(jax.random.key(1), (4, 32)))
  encoded = EncoderOutput(jnp.zeros((4, 8, 32)), pooled_BD, jnp.zeros((128, 32)))
  boxed = jax.jit(lambda r: head.init(r, encoded, {}, True))(jax.random.key(0))
  kernel = boxed["params"]["classifier"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "classes")
  assert kernel.value.shape == (32, 3)
  variables = nn.meta.unbox(boxed)
  logits, dropped = jax.jit(lambda v: (head.apply(v, encoded, {}, True), [
      head.apply(v, encoded, {}, False, rngs={"dropout": jax.random.key(k)}) for k in range(2)]))(
          variables)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, pooled_BD @ variables["params"]["classifier"]["kernel"],
                             rtol=1e-5, atol=1e-6)  # The bias starts at zero.
  assert not np.allclose(dropped[0], dropped[1])  # Dropout when training.


def test_the_head_inside_the_pretrainer():
  objective = Classify(3)
  # A partial of the head class, called by the Pretrainer as head(config, name=...).
  model = Pretrainer(CONFIG, heads=((objective.name, objective.head),))
  batch = _batch()
  # Shapes from init, values drawn here: compiling the initialiser would cost seconds.
  abstract = jax.eval_shape(lambda r: model.init({"params": r}, batch, deterministic=True),
                            jax.random.key(0))
  assert abstract["params"]["classify"]["classifier"]["kernel"].names == ("embed", "classes")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
      nn.meta.unbox(abstract)["params"])
  assert params["classify"]["classifier"]["kernel"].shape == (32, 3)

  @jax.jit
  def loss_and_grads(params):
    def loss_fn(p):
      outputs = model.apply({"params": p}, batch, deterministic=True)
      loss, aux = objective.loss(outputs, batch)
      return loss, (outputs["classify"], aux)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (logits, aux)), grads = loss_and_grads(params)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(float(loss))  # Padding row too.
  assert float(aux["accuracy"][1]) == 3.0  # The padding row carries no weight.
  # Gradients reach the encoder through the pooler.
  assert float(jnp.abs(grads["encoder"]["layer_0"]["attention"]["query"]["kernel"]).sum()) > 0


def test_the_head_needs_its_class_count():
  with pytest.raises(TypeError):
    ClassificationHead(CONFIG)
