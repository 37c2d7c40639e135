"""BERT model sizes (Turc et al. 2019 for the small ones; Devlin et al. 2019 for base/large)."""

import ml_collections

# name: (layers, hidden, heads). The MLP is 4 x hidden, as in every BERT.
SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def bert(size: str, vocab_size: int = 30522) -> ml_collections.ConfigDict:
  """`config.model` for a BERT of the given size. Every key is read by `ModelConfig`."""
  layers, hidden, heads = SIZES[size]
  return ml_collections.ConfigDict(
      dict(
          vocab_size=vocab_size,  # Rows of the embedding; the tokenizer may not exceed it.
          hidden_size=hidden,
          num_layers=layers,
          num_heads=heads,
          mlp_dim=4 * hidden,
          max_position=512,  # Rows of the position table: the longest data.seq_len allowed.
          type_vocab_size=2,  # Segment A / segment B; 0: no token-type table (ModernBERT).
          dropout_rate=0.1,  # On embeddings, attention output and MLP output.
          attention_dropout_rate=0.1,  # On attention probabilities.
          pre_layer_norm=False,  # False: BERT's post-LN. True: pre-LN (+ a final LayerNorm).
          # Pre-LN only. False: no norm before layer 0's attention, which reads the (already
          # normalised) embeddings as ModernBERT's does. Needs scan_layers=False.
          first_layer_attention_norm=True,
          layer_norm_eps=1e-12,
          initializer_range=0.02,  # Stddev of the truncated normal for every weight.
          dtype="float32",  # Compute dtype: float32 | bfloat16 | float16.
          param_dtype="float32",  # Storage dtype of parameters and optimizer state.
          # Rematerialisation per layer: none (keep all activations), full (keep only the layer
          # input, recompute the rest), save_dots (keep matmul outputs, recompute the rest).
          remat_policy="none",
          scan_layers=False,  # nn.scan over layers: compile time flat in depth.
          # absolute: BERT's learned position table; relative: Transformer-XL attention over
          # sinusoidal query-key offsets (XLNet's), no position table; rope: rotary embeddings
          # of queries and keys (RoFormer, ModernBERT), no position table.
          position_encoding="absolute",
          rope_theta=10000.0,  # RoPE's base (read with position_encoding=rope only).
          # gelu: BERT's MLP; geglu | swiglu: gated MLPs, act(wi_gate h) * wi_up h, with 3
          # matrices instead of 2: lower mlp_dim (e.g. to 2/3) to keep the FLOPs.
          mlp_activation="gelu",
          use_bias=True,  # False: no bias in any dense layer, LayerNorm or the vocab output.
          norm="layer_norm",  # layer_norm | rms_norm (for every norm; eps is layer_norm_eps).
          # True: the MLM/LM output projection is the token embedding (BERT); False: its own.
          tie_output_embedding=True,
          # True: BERT's dense + GELU + norm before the MLM/LM output; False: logits straight
          # from the encoder output.
          mlm_head_transform=True,
          # einsum: jaxlm's attention einsums; xla | cudnn: jax.nn.dot_product_attention with that
          # implementation. Both need attention_dropout_rate=0 (no dropout there); cudnn (flash
          # attention) needs an NVIDIA GPU, dtype bfloat16/float16, a head size multiple of 8,
          # no relative positions, and still reads the mask as a dense bias.
          attention_impl="einsum",
      )
  )


def modern(size: str, vocab_size: int = 30522) -> ml_collections.ConfigDict:
  """`bert(size)` with the modern encoder's choices (ModernBERT, Cramming, MosaicBERT): pre-LN
  in ModernBERT's layout (no norm before layer 0's attention, whose input is the normalised
  embeddings), rotary positions, no token-type table, a GEGLU MLP at 2/3 of BERT's width (the
  same MLP FLOPs), no biases, no dropout. Exports to Hugging Face's `ModernBertForMaskedLM`."""
  config = bert(size, vocab_size)
  hidden = config.hidden_size
  config.update(
      pre_layer_norm=True,
      first_layer_attention_norm=False,
      type_vocab_size=0,
      position_encoding="rope",
      mlp_activation="geglu",
      mlp_dim=_round_up(8 * hidden // 3, 32),
      use_bias=False,
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      layer_norm_eps=1e-5,
  )
  return config


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple
