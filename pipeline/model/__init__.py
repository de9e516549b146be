"""The GPT (KV cache included), decoding, and loading a model folder."""
