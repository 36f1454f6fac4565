"""mtplx.generation.chat_template: the same ids from mlx-lm's tokenizer wrapper and from a plain
transformers tokenizer (whose apply_chat_template returns a BatchEncoding, not a dict)."""

from __future__ import annotations

from pathlib import Path

import mtplx
from mtplx.generation.chat_template import chat_ids

DEMO_DIR = Path(mtplx.__file__).parent / "demo" / "tiny-qwen35-mtp"


def test_a_plain_transformers_tokenizer_gives_the_wrappers_ids():
    from mlx_lm.tokenizer_utils import load as load_wrapper
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Rename total to acc, please."}]
    plain = chat_ids(AutoTokenizer.from_pretrained(DEMO_DIR), messages, False, True)
    wrapped = chat_ids(load_wrapper(DEMO_DIR), messages, False, True)
    assert plain == wrapped and len(plain) > 8 and all(isinstance(t, int) for t in plain)
