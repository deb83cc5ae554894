"""Shared building blocks: rotary embeddings, the MoE layer and the transformer LM."""
