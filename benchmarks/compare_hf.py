"""jaxlm's train step against Hugging Face transformers' PyTorch BERT, same shape, one process.

  pip install -e '.[bench]'
  python benchmarks/compare_hf.py [--config=experiments/bert_mini.py] [--vocab_size=32000]
      [--seq_len=128] [--batch_size=32] [--steps=20] [--warmup=3] [--rounds=2]

jaxlm: `jaxlm.training.throughput.step_benchmark`, the jitted step a run uses (MLM logits at
the predicted positions only, at most `max_predictions_per_seq` per sequence, + NSP, the config's
optimizer).
Hugging Face: `BertForPreTraining` with `torch.optim.AdamW`, float32, MLM logits at every
position as it computes them (labels -100 except the positions jaxlm's masking chose, about
15%), NSP labels; the same token ids, segments, sizes and dropout. Each side runs `--warmup`
steps, then `--steps` timed ones (the median counts); the sides alternate for `--rounds`
rounds and each keeps its best round, so a busy moment of a shared machine hits both alike.
Prints the machine, each round, and the last line is JSON with both tokens/s and their ratio.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # jaxlm and configs/ from this checkout.


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "bert_mini.py"),
                      help="Experiment config file (its model, objectives and optimizer).")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20, help="Timed steps per side and round.")
  parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
  parser.add_argument("--rounds", type=int, default=2, help="Rounds, alternating the sides.")
  return parser.parse_args(argv)


def load_config(args: argparse.Namespace):
  import importlib.util

  spec = importlib.util.spec_from_file_location("experiment", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.vocab_size = args.vocab_size
  config.data.seq_len = args.seq_len
  config.data.batch_size = args.batch_size
  return config


def machine() -> dict:
  import torch

  from jaxlm import huge_pages

  model = "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   model)
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "malloc_huge_pages": huge_pages.enabled_in_this_process()}


def torch_inputs(config, objectives) -> dict:
  """jaxlm's synthetic batch (the same ids, segments and masks) as BertForPreTraining's inputs."""
  import numpy as np
  import torch

  from jaxlm.training.throughput import synthetic_rows

  batch = synthetic_rows(config, objectives, 0, config.data.batch_size)
  labels = np.full(batch["input_ids"].shape, -100, np.int64)
  rows, slots = np.nonzero(batch["mlm_weights"] > 0)
  labels[rows, batch["mlm_positions"][rows, slots]] = batch["mlm_ids"][rows, slots]
  return {
      "input_ids": torch.from_numpy(batch["mlm_input_ids"].astype(np.int64)),
      "token_type_ids": torch.from_numpy(batch["token_type_ids"].astype(np.int64)),
      "attention_mask": torch.from_numpy((batch["input_ids"] != 0).astype(np.int64)),
      "labels": torch.from_numpy(labels),
      "next_sentence_label": torch.from_numpy(batch["next_sentence_label"].astype(np.int64)),
  }


def torch_benchmark(config, inputs: dict, steps: int, warmup: int) -> dict:
  import torch
  from transformers import BertConfig, BertForPreTraining

  m = config.model
  torch.manual_seed(0)
  model = BertForPreTraining(BertConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
      max_position_embeddings=m.max_position, type_vocab_size=m.type_vocab_size,
      hidden_dropout_prob=m.dropout_rate, attention_probs_dropout_prob=m.attention_dropout_rate,
      layer_norm_eps=m.layer_norm_eps, initializer_range=m.initializer_range))
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.learning_rate,
                                weight_decay=0.01)
  times = []
  for i in range(warmup + steps):
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    if i >= warmup:
      times.append(time.perf_counter() - started)
  step_s = statistics.median(times)
  return {"tokens_per_sec": round(config.data.batch_size * config.data.seq_len / step_s, 1),
          "step_ms": round(1e3 * step_s, 2), "attention": model.config._attn_implementation}


def main(argv=None):
  args = parse_args(argv)
  import numpy as np

  from jaxlm.training.throughput import step_benchmark
  from jaxlm.objectives import DataSpec, build_objectives

  config = load_config(args)
  d, m = config.data, config.model
  objectives = build_objectives(config.objectives,
                                DataSpec(m.vocab_size, d.seq_len, np.ones(m.vocab_size, bool)),
                                config.eval)
  if sorted(o.name for o in objectives) != ["mlm", "nsp"]:
    sys.exit("compare_hf.py compares MLM + NSP (BertForPreTraining); the config enables "
             f"{[o.name for o in objectives]}.")
  inputs = torch_inputs(config, objectives)
  print(json.dumps({"machine": machine(), "shape": {
      "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads, "mlp": m.mlp_dim,
      "vocab": m.vocab_size, "seq_len": d.seq_len, "batch_size": d.batch_size,
      "dropout": m.dropout_rate, "max_predictions_per_seq": next(
          o.masking.max_predictions for o in objectives if o.name == "mlm")}}))
  rounds = []
  for r in range(args.rounds):
    jax_result = step_benchmark(config, args.steps, args.warmup)
    hf_result = torch_benchmark(config, inputs, args.steps, args.warmup)
    rounds.append((jax_result, hf_result))
    print(json.dumps({"round": r, "jaxlm_tokens_per_sec": jax_result["tokens_per_sec"],
                      "jaxlm_mfu": jax_result["mfu"], "hf_tokens_per_sec":
                      hf_result["tokens_per_sec"], "ratio": round(
                          jax_result["tokens_per_sec"] / hf_result["tokens_per_sec"], 3),
                      "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)
  best_jax = max((j for j, _ in rounds), key=lambda x: x["tokens_per_sec"])
  best_hf = max((h for _, h in rounds), key=lambda x: x["tokens_per_sec"])
  print(json.dumps({
      "jaxlm_tokens_per_sec": best_jax["tokens_per_sec"], "jaxlm_step_ms": best_jax["step_ms"],
      "jaxlm_mfu": best_jax["mfu"], "peak_flops": best_jax["peak_flops"],
      "hf_tokens_per_sec": best_hf["tokens_per_sec"], "hf_step_ms": best_hf["step_ms"],
      "hf_attention": best_hf["attention"],
      "ratio": round(best_jax["tokens_per_sec"] / best_hf["tokens_per_sec"], 3),
      "rounds": len(rounds), "machine": machine()}))


if __name__ == "__main__":
  from jaxlm import huge_pages

  huge_pages.reexec_with_huge_pages()  # As `python -m jaxlm.bench` does: both sides get it.
  main()
