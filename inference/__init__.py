"""Inference from the experiment's models: KV-cached generation and the decode benchmark (uses models/, never training/)."""
