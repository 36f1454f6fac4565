"""Choosing the reduced draft vocabulary a graft stores in the sidecar.

The draft step pays for the shared lm_head over the whole vocabulary (248,320 rows on
Qwen3.5); drafting from the K most useful tokens costs a K-row projection instead, and stays
exact (the model layer's DraftVocab explains why). Which K: the most frequent tokens of a text
the user passes, else the tokenizer's merge order (byte-level BPE gives ids in the order its
merges were learnt, so low ids are the bytes and the most common merges). The special and
control tokens (EOS, <|im_start|>, <|im_end|>, <think>, ...) are always in: a draft that can
never propose the end of a turn loses the last token of every reply.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mtplx.errors import MtplxError

DEFAULT_DRAFT_VOCAB = 32768


def subset_size(requested: int | None, vocab_size: int) -> int | None:
    """How many ids to keep, or ``None`` for the full head: ``None`` asks for the default
    (32768 where the vocabulary is larger), 0 keeps the full head, as does K >= V."""
    if requested is None:
        requested = DEFAULT_DRAFT_VOCAB
    if requested < 0:
        raise MtplxError(f"--draft-vocab {requested} is negative", fix="pass K > 0, or 0 to keep the full head")
    if requested == 0 or requested >= vocab_size:
        return None
    return requested


def special_token_ids(tokenizer: Any) -> list[int]:
    """EOS ids, the tokenizer's special tokens and every added (control) token."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    ids.update(getattr(tokenizer, "all_special_ids", None) or [])
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return sorted(ids)


@dataclass
class DraftVocabChoice:
    ids: list[int]  # sorted, unique
    chosen_by: str  # "merge_order" | "text_frequency"
    special_tokens: int
    text_sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        out = {"size": len(self.ids), "chosen_by": self.chosen_by, "special_tokens": self.special_tokens}
        if self.text_sha256:
            out["text_sha256"] = self.text_sha256
        return out


def choose_draft_vocab(tokenizer: Any, vocab_size: int, k: int, text: str | None = None) -> DraftVocabChoice:
    """K ids: every special token, then by frequency on ``text`` (ties and unseen tokens in
    merge order), else in merge order."""
    specials = [i for i in special_token_ids(tokenizer) if 0 <= i < vocab_size]
    if k < len(specials):
        raise MtplxError(f"--draft-vocab {k} is smaller than the tokenizer's {len(specials)} special tokens",
                         fix=f"pass at least {len(specials)} (or 0 to keep the full head)")
    ranking: list[int] = []
    if text is not None:
        counts = Counter(i for i in tokenizer.encode(text) if 0 <= i < vocab_size)
        if not counts:
            raise MtplxError("the --vocab-text file holds no tokens", fix="pass a text of the kind you will generate")
        ranking = sorted(counts, key=lambda i: (-counts[i], i))
    chosen = set(specials)
    for i in ranking:
        if len(chosen) >= k:
            break
        chosen.add(i)
    # Merge order fills what the text did not reach; ids the tokenizer never produces (Qwen pads
    # its embedding past the tokenizer's vocabulary) come last.
    known = min(len(tokenizer.vocab), vocab_size) if hasattr(tokenizer, "vocab") else vocab_size
    for i in itertools.chain(range(known), range(known, vocab_size)):
        if len(chosen) >= k:
            break
        chosen.add(i)
    return DraftVocabChoice(
        ids=sorted(chosen),
        chosen_by="text_frequency" if text is not None else "merge_order",
        special_tokens=len(specials),
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest() if text is not None else None,
    )
