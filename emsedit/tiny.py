"""Tiny, offline, deterministic tokenizers and causal LMs for tests and the tiny workflow.

Everything here is built in-process from a fixed built-in corpus and a seed: no network, no model
hub, no files read. Two styles mirror the two model families the suite edits:

* ``"llama"`` — a Llama-architecture model (``nn.Linear`` MLP projections); the tokenizer prepends a
  BOS token ``<s>``, has EOS ``</s>``, and uses EOS as its pad token (as SmolLM2 does).
* ``"gpt2"`` — a GPT-2 model (transformers ``Conv1D`` projections, weight stored (in, out)); the
  tokenizer adds no BOS, has a single ``<|endoftext|>`` token for BOS/EOS/UNK and **no pad token**
  (as the real GPT-2 tokenizer), so code that pads must set one itself.

Both tokenizers are byte-level BPE, so any text round-trips through encode/decode. The BPE merges
are learned by a small pure-Python learner below (ties broken lexicographically), which makes the
vocabulary identical across processes and machines.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from emsedit.data import EditRequest

__all__ = [
    "CORPUS",
    "make_tokenizer",
    "make_tiny_llama",
    "make_tiny_gpt2",
    "save_tiny_model",
    "tiny_requests",
    "tiny_zsre_records",
]

Style = Literal["llama", "gpt2"]

#: Fixed training text for the tiny tokenizers: short factual sentences in the shape of zsRE /
#: CounterFact prompts, plus common question words, relations, places, languages and names.
CORPUS: tuple[str, ...] = (
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.",
    "The capital of Japan is Tokyo.",
    "The capital of England is London.",
    "The capital of Russia is Moscow.",
    "The capital of China is Beijing.",
    "The capital of Canada is Ottawa.",
    "The capital of Egypt is Cairo.",
    "The official language of France is French.",
    "The official language of Germany is German.",
    "The mother tongue of Danielle Darrieux is French.",
    "The native language of Pablo Picasso is Spanish.",
    "Apple was founded by Steve Jobs.",
    "Microsoft was founded by Bill Gates.",
    "Toyota is headquartered in Japan.",
    "Nokia is a company from Finland.",
    "The Eiffel Tower is located in Paris.",
    "The Colosseum is located in Rome.",
    "Big Ben is in London, which is in England.",
    "Lionel Messi plays soccer for Argentina.",
    "Michael Jordan plays basketball.",
    "Tom Brady plays football as a quarterback.",
    "Which position does he play? He plays the position of goalkeeper.",
    "What is the name of the river? The river is the Nile.",
    "Who is the author of Hamlet? The author is William Shakespeare.",
    "Who was the director of the film? The director was Steven Spielberg.",
    "What country is Mount Fuji in? It is in Japan.",
    "Which city was she born in? She was born in Chicago.",
    "What is the occupation of Albert Einstein? He was a physicist.",
    "Marie Curie was a chemist and a physicist who worked in Paris.",
    "Isaac Newton was an English mathematician.",
    "What is the religion of the king? His religion is Christianity.",
    "The original language of the show was English.",
    "The network that broadcast the show was BBC.",
    "The record label of the band was Columbia Records.",
    "The genre of the album is jazz, rock and pop music.",
    "The team won the championship in the year 1998.",
    "He is a citizen of the United States of America.",
    "She is a member of the political party.",
    "The manufacturer of the car is Honda.",
    "The operating system was developed by Google.",
    "The instrument he plays is the piano, the guitar or the violin.",
    "The composer wrote a symphony and an opera.",
    "The university is located in the city of Boston.",
    "The mountain range is in the continent of Asia.",
    "The island is part of the country of Greece.",
    "The species belongs to the family of birds.",
    "The star is in the constellation of Orion.",
    "What sports team does he play for? He plays for Chelsea.",
    "When did the war end? The war ended in 1945.",
    "Where did they die? They died in Vienna.",
    "Who is the spouse of the president? His wife is a lawyer.",
    "The language spoken in Brazil is Portuguese.",
    "The currency of Japan is the yen.",
    "The Amazon river flows through South America.",
    "Africa, Europe, Asia, Australia and Antarctica are continents.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are days.",
    "January, February, March, April, May, June, July, August, September, October, "
    "November and December are months.",
    "one two three four five six seven eight nine ten hundred thousand million",
    "red green blue yellow black white orange purple brown",
    "the of and to in is was for on with as by at from that this it he she they his her their",
    "new old first last good great small large long short high low early late",
    "man woman child people family friend king queen prince president minister",
    "city town village country state nation region province county district",
    "company school university church hospital museum library airport station",
    "born died lived worked played wrote created founded named called known",
    "music film book song album novel poem painting game show series episode",
    "water fire earth air sun moon star sky sea ocean lake river mountain forest",
    "English French German Spanish Italian Russian Chinese Japanese Arabic Latin Dutch Swedish",
    "Paris London Berlin Rome Madrid Tokyo Moscow Vienna Prague Warsaw Dublin Athens",
    "Google Apple Microsoft Amazon Nokia Sony Honda Toyota IBM Intel BMW",
    "actor actress singer writer painter poet scientist engineer doctor teacher lawyer",
    "Q: What is it? A: It is a question and an answer.",
    "True or false? The statement is true, not false.",
    "1 2 3 4 5 6 7 8 9 0 10 20 100 2000 2024",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
)


def _learn_merges(words: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges over byte-level words: most frequent pair first, ties broken by the pair."""
    splits: dict[str, list[str]] = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for a, b in zip(symbols, symbols[1:]):
                pair_counts[(a, b)] += count
        if not pair_counts:
            break
        best = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in splits.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return merges


@functools.lru_cache(maxsize=None)
def _bpe_model_parts(n_merges: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Compute (ordered non-special vocabulary, merges) once per process; pure function of CORPUS."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[str] = Counter()
    for line in CORPUS:
        for piece, _ in pre.pre_tokenize_str(line):
            words[piece] += 1
    merges = _learn_merges(words, n_merges)
    vocab = list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    return tuple(vocab), tuple(merges)


def make_tokenizer(style: Style = "llama", *, n_merges: int = 300) -> PreTrainedTokenizerFast:
    """Build the deterministic tiny byte-level BPE tokenizer for ``style`` ("llama" or "gpt2").

    llama: ids 0,1 are ``<s>`` (BOS, prepended to every sequence) and ``</s>`` (EOS, also pad).
    gpt2: id 0 is ``<|endoftext|>`` (BOS/EOS/UNK); nothing is prepended; no pad token.
    Padding side is right. The vocabulary size is ``len(tokenizer)`` (about 560 by default).
    """
    if style not in ("llama", "gpt2"):
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'llama' or 'gpt2'")
    specials = ["<s>", "</s>"] if style == "llama" else ["<|endoftext|>"]
    base_vocab, merges = _bpe_model_parts(n_merges)
    vocab = {tok: i for i, tok in enumerate(specials + list(base_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if style == "llama":
        bos = ("<s>", vocab["<s>"])
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[bos]
                ),
            ]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="</s>",
            padding_side="right",
            model_max_length=512,
        )
    tok.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="right",
        model_max_length=512,
    )


def make_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    n_layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Build a randomly initialised tiny Llama (``nn.Linear`` projections) in eval mode.

    The global torch RNG is left untouched (initialisation runs under a forked RNG seeded by
    ``seed``), so the same arguments always give the same weights.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def make_tiny_gpt2(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    n_layers: int = 2,
    n_embd: int = 32,
    dtype: torch.dtype = torch.float32,
) -> GPT2LMHeadModel:
    """Build a randomly initialised tiny GPT-2 (transformers ``Conv1D`` projections) in eval mode.

    Like :func:`make_tiny_llama`, initialisation is seeded and leaves the global RNG untouched.
    """
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=tokenizer.model_max_length,
        n_embd=n_embd,
        n_layer=n_layers,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.to(dtype).eval()


#: Edited modules of the tiny models: the MLP output projection of both layers.
TINY_EDIT_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers.{0..1}.mlp.down_proj",),
    "gpt2": ("transformer.h.{0..1}.mlp.c_proj",),
}


def save_tiny_model(
    out_dir: str | Path,
    style: Style = "llama",
    seed: int = 0,
    *,
    yaml_path: str | Path | None = None,
) -> Path:
    """Write a tiny model + tokenizer to ``out_dir`` and a matching model YAML; return the YAML path.

    The YAML (default ``out_dir/model.yaml``) is a valid :class:`emsedit.config.ModelConfig` with an
    absolute ``name_or_path`` pointing at ``out_dir``, float32, and both layers' MLP output
    projection as edited modules (``down_proj`` for llama, ``mlp.c_proj`` for gpt2).
    """
    import yaml  # local: only this writer needs it

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(style)
    build = make_tiny_llama if style == "llama" else make_tiny_gpt2
    model = build(tokenizer, seed=seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    doc = {
        "name": f"tiny-{style}",
        "name_or_path": str(out),
        "edit_modules": list(TINY_EDIT_MODULES[style]),
        "dtype": "float32",
    }
    target = Path(yaml_path) if yaml_path is not None else out / "model.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Tiny random {style} model for tests and the tiny workflow (seed {seed}); generated.\n"
    target.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target


#: Subjects and one-token targets of :func:`tiny_zsre_records` (words of the tiny tokenizers' corpus).
TINY_SUBJECTS = ("France", "Germany", "Italy", "Spain", "Japan", "England", "Russia", "China", "Canada", "Egypt",
                 "Brazil", "Greece", "Finland", "Austria", "Asia", "Africa", "Europe", "Paris", "London", "Rome")
TINY_TARGETS = ("Paris", "London", "Rome", "French", "German", "Japan", "river", "show")


def tiny_requests(n: int, offset: int = 0, *, subjects: int = 16) -> list[EditRequest]:
    """``n`` zsRE-style :class:`~emsedit.data.EditRequest` objects in the tiny vocabulary, numbered from
    ``offset``; the subject cycles over the first ``subjects`` of :data:`TINY_SUBJECTS` (the editor
    tests' turns use 16), the one-token target over :data:`TINY_TARGETS`."""
    if not 1 <= subjects <= len(TINY_SUBJECTS):
        raise ValueError(f"subjects must be in 1..{len(TINY_SUBJECTS)}, got {subjects}")
    out = []
    for i in range(offset, offset + n):
        s = TINY_SUBJECTS[i % subjects]
        out.append(EditRequest(
            index=i, prompt=f"The capital of {s}", target=TINY_TARGETS[i % len(TINY_TARGETS)], old_target=None,
            rephrases=(f"What is the capital of {s}",), loc_prompts=(f"The language spoken in {s}?",),
            loc_answer="French", loc_old_answer=None))
    return out


def tiny_zsre_records(n: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` MALMEN-schema zsRE records (src, ans, rephrase, loc, loc_ans) in the tiny vocabulary,
    numbered from ``offset`` (tests and the benchmark's ``--quick`` dataset)."""
    out = []
    for i in range(offset, offset + n):
        s = TINY_SUBJECTS[i % len(TINY_SUBJECTS)]
        out.append({"src": f"The capital of {s}", "ans": TINY_TARGETS[i % len(TINY_TARGETS)],
                    "rephrase": f"What is the capital of {s}", "loc": f"The language spoken in {s}",
                    "loc_ans": "French"})
    return out
