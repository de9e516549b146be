"""Text to tokens: the BPE tokenizer, token shards, the fine-tuning task data."""
