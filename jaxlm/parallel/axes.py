"""Logical axis names: the vocabulary shared by modules and the sharding rules.

Every parameter and every major activation is named with these; `jaxlm.parallel.rules` maps
them to mesh axes. Keep the set small: a new name needs a rule.
"""

BATCH = "batch"  # Examples in a batch.
LENGTH = "length"  # Positions in a sequence (activations).
EMBED = "embed"  # The model (hidden) dimension.
EMBED_OUT = "embed_out"  # The output side of a hidden -> hidden projection (pooler, MLM transform).
MLP = "mlp"  # The feed-forward hidden dimension.
HEADS = "heads"  # Attention heads.
KV = "kv"  # Per-head dimension of queries, keys and values.
VOCAB = "vocab"  # Token vocabulary (embedding rows, MLM output).
POSITION = "position"  # Rows of the position-embedding table.
TOKEN_TYPE = "token_type"  # Rows of the token-type (segment) embedding table.
CLASSES = "classes"  # Outputs of a small classifier (NSP).
PREDICTIONS = "predictions"  # Predicted positions per sequence (MLM).
LAYERS = "layers"  # The stacked layer axis of scanned parameters (never sharded).
