"""Tokenizers: the experiment's Hub tokenizer, or a byte-level BPE trained offline on the corpus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class TextTokenizer:
    name: str
    vocab_size: int
    encode: Callable[[str], list[int]]
    eos_token_id: int | None


def hub_tokenizer(name: str) -> TextTokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    return TextTokenizer(name, len(tok), lambda text: tok.encode(text, add_special_tokens=False), tok.eos_token_id)


def train_offline_tokenizer(documents: list[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained on the documents themselves; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return TextTokenizer(
        f"byte-level BPE ({tok.get_vocab_size()} tokens) trained offline on the corpus",
        tok.get_vocab_size(),
        lambda text: tok.encode(text).ids,
        tok.token_to_id("<|endoftext|>"),
    )
