"""Tiny tokenizers built in-process for tests: a GPT-2-style one (no BOS) and a Llama-style one (BOS).

Both are byte-level BPE tokenizers trained in a fraction of a second on a few sentences with the
``tokenizers`` library and wrapped in ``transformers.PreTrainedTokenizerFast``, so they behave like
the real ones where it matters for spec §4.2: ``tok(text)`` adds the model's default special tokens
(nothing for GPT-2, ``<s>`` in front for Llama), ``add_special_tokens=False`` adds none, and no EOS
is ever appended. Special tokens get the last ids, as in GPT-2 and Llama-3, so id 0 is an ordinary
token (it is the value ``input_ids`` are padded with).
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CORPUS", "gpt2_style_tokenizer", "llama_style_tokenizer"]

#: Sentences the tiny tokenizers are trained on (any text still tokenises: the alphabet is all bytes).
CORPUS: tuple[str, ...] = (
    "The mother tongue of Danielle Darrieux is French",
    "Where Danielle Darrieux is from, people speak the language of English",
    "What is the product made by UniFirst? uniform unmanned aircraft",
    "nq question: john goodman's character in the big lebowski? Walter Sobchak",
    "Toko Yasuda, the piano guitar player. John Lennon performs on the guitar",
    "When was the inception of the IAAF Combined Events Challenge? 2006 1998",
)


def _train_byte_level_bpe(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE model (no special tokens yet) on :data:`CORPUS`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    return tok


@lru_cache(maxsize=None)
def _gpt2_backend(vocab_size: int) -> str:
    tok = _train_byte_level_bpe(vocab_size)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


@lru_cache(maxsize=None)
def _llama_backend(vocab_size: int) -> str:
    tok = _train_byte_level_bpe(vocab_size)
    tok.add_special_tokens(["<s>", "</s>"])
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tok.to_str()


def gpt2_style_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer: byte-level BPE, ``<|endoftext|>`` as BOS/EOS, no token added by default."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_gpt2_backend(vocab_size)),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def llama_style_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: byte-level BPE that puts ``<s>`` in front by default; EOS ``</s>``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_llama_backend(vocab_size)),
        bos_token="<s>",
        eos_token="</s>",
    )
