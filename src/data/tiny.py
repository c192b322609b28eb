"""The embedded tiny default: a synthetic language, its tokenizer and a tiny Llama built from config.

Nothing is downloaded. The language is pseudo-words made of consonant-vowel syllables plus the integers 0..99
(the same recipe as the shared benchmark workload); the shipped tokenizer has one token for each (``Ġitem``). Every
prompt is ``" item item ... ="``: 6-14 items, each with its leading space, and `` =`` to mark where the answer
starts. Three tasks are generated deterministically from a seed:

* ``sft``: ``completion`` = ``" item item ..."``, the prompt's items copied in order, token for token (learn to
  copy: an induction circuit, which is why held-out prompts can be copied after training on fresh rows).
* ``preference``: ``chosen`` copies the prompt, ``rejected`` is fresh random items with many numbers. DPO learns the
  preference quickly (fewer numbers) and slowly (copying).
* ``prompt``: prompts only, with an ``answer`` column (the prompt's items) for rewards that want one. The default
  GRPO/PPO reward is the digit fraction of the completion, which a random model scores ~0.05 on.

``python -m src.data.tiny`` rebuilds the shipped ``tiny/tokenizer.json`` (byte-level BPE, 2048 tokens).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Any

TINY = "tiny"  # the model/tokenizer name that selects the embedded default
TOKENIZER_FILE = Path(__file__).with_name("tiny") / "tokenizer.json"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
VOCAB_SIZE = 2048
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
PROMPT_END = " ="  # ends every generated prompt: the answer starts after it (tokens ``Ġ``, ``=``)
# A plain-text chat template so conversational rows work with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_MODEL_CONFIG: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=512,
    max_position_embeddings=512,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def lexicon(n_words: int = 800, seed: int = 1234) -> list[str]:
    rng = random.Random(seed * 1000 + 1)
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words: list[str] = []
    while len(words) < n_words:
        w = "".join(rng.choice(syllables) for _ in range(rng.choice([2, 2, 3])))
        if w not in words:
            words.append(w)
    return words


def _item(rng: random.Random, words: list[str], p_number: float) -> str:
    return str(rng.randint(0, 99)) if rng.random() < p_number else rng.choice(words)


def build_tokenizer(out: Path = TOKENIZER_FILE) -> None:
    """Train the byte-level BPE tokenizer on 20k synthetic lines and write ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    words, rng = lexicon(), random.Random(1234 * 1000 + 2)
    corpus = [" ".join(_item(rng, words, 0.2) for _ in range(rng.randint(8, 48))) for _ in range(20000)]
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))


def load_tokenizer():
    """The shipped tiny tokenizer as a ``PreTrainedTokenizerFast`` (prepends BOS, never appends EOS)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=TINY_MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(overrides: dict[str, Any] | None = None, attn_implementation: str | None = None):
    """A randomly initialised tiny ``LlamaForCausalLM`` (1.57M parameters by default), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return LlamaForCausalLM(LlamaConfig(**{**TINY_MODEL_CONFIG, **(overrides or {}), **extra}))


@lru_cache(maxsize=8)
def generate_rows(kind: str, n_rows: int = 2048, seed: int = 0, min_items: int = 6, max_items: int = 14) -> tuple:
    """Deterministic rows of the synthetic task for ``kind`` in ``sft``, ``preference``, ``prompt``.

    A prompt is ``" item item ... ="``: every item is one token of the shipped tokenizer (``Ġitem``), and the trailing
    `` =`` marks where the answer starts; a copy is ``" item item ..."``, the same tokens (then EOS). Lengths are
    counted in items, so sequences stay short (``max_items`` + 3 prompt tokens) and a step is fast.
    """
    if kind not in ("sft", "preference", "prompt"):
        raise ValueError(f"tiny task: unknown kind {kind!r}; expected sft, preference or prompt")
    words, rng = lexicon(), random.Random(f"{kind}-{seed}")
    rows = []
    for _ in range(n_rows):
        items = [_item(rng, words, 0.2) for _ in range(rng.randint(min_items, max_items))]
        copy = " " + " ".join(items)
        prompt = copy + PROMPT_END
        if kind == "sft":
            rows.append({"prompt": prompt, "completion": copy})
        elif kind == "preference":
            rejected = [_item(rng, words, 0.5) for _ in range(rng.randint(min_items, max_items))]
            rows.append({"prompt": prompt, "chosen": copy, "rejected": " " + " ".join(rejected)})
        else:
            rows.append({"prompt": prompt, "answer": copy.strip()})
    return tuple(rows)


if __name__ == "__main__":
    build_tokenizer()
    print(f"wrote {TOKENIZER_FILE}")
