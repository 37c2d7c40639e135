"""Text to batches: corpus reading, the sentencepiece tokenizer, BERT example building,
masking, and the deterministic, resumable, host-sharded loader. Knows no objective."""
