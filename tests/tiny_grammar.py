"""A tiny tokenizer and grammar for constrained-decoding tests on tiny random models.

Eight tokens: end-of-sequence and seven pieces over {a, b, c}. The grammar is "no b before the
first c" (regex ``a*(c[abc]*)?z``; no token holds a ``z``, so it never completes and
end-of-sequence is never allowed). Before a ``c`` only ``a``, ``aa`` and ``c`` are allowed;
after one, every piece. Appending text only ever relaxes it, so a matcher that forgets to
roll back rejected drafts still accepts every token sampled from the correct mask: the bug
shows in the output law (tests/test_constraint_law.py), not as a crash.

:func:`reference_allowed` states the grammar in plain Python, independently of llguidance.
"""

from __future__ import annotations

import llguidance
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PIECES = ["<|eos|>", "a", "b", "c", "ab", "ba", "aa", "bb"]
EOS = 0
GRAMMAR_REGEX = "a*(c[abc]*)?z"


def tiny_tokenizer() -> Tokenizer:
    """A real Hugging Face ``tokenizers`` tokenizer (byte-level BPE) over :data:`PIECES`."""
    vocab = {piece: i for i, piece in enumerate(PIECES)}
    merges = [(p[0], p[1]) for p in PIECES[1:] if len(p) == 2]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([PIECES[EOS]])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class HFStyle:
    """Exposes a ``tokenizers`` tokenizer as ``backend_tokenizer``, as a fast HF tokenizer does."""

    def __init__(self, tok: Tokenizer):
        self.backend_tokenizer = tok


def grammar_tokenizer() -> llguidance.LLTokenizer:
    from mtplx.engine.constraints import grammar_tokenizer as view

    return view(HFStyle(tiny_tokenizer()), len(PIECES), [EOS])


def grammar() -> str:
    return llguidance.LLMatcher.grammar_from_regex(GRAMMAR_REGEX)


def text(tokens) -> str:
    return "".join(PIECES[t] for t in tokens)


def reference_allowed(tokens) -> np.ndarray:
    """Bool [8]: the tokens the grammar allows after ``tokens``, computed without llguidance."""
    prefix = text(tokens)

    def viable(s: str) -> bool:
        return "b" not in s.split("c", 1)[0]

    return np.array([t != EOS and viable(prefix + piece) for t, piece in enumerate(PIECES)])
