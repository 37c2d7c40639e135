"""Text to batches: reading and preparing corpora into token shards, the sentencepiece tokenizer,
example formats computed lazily from the shards, masking, and the deterministic, host-sharded
loader. Knows no objective."""
