"""Measure the grammar engines mtplx could constrain decoding with, on the demo's tokenizer.

    python3 tools/measure_grammar_engines.py            # every engine importable here

For llguidance and xgrammar (whichever import): the time to build the engine's tokenizer
view, to compile a JSON schema and the generic JSON grammar, the time per token to compute
a mask while walking a valid document, and the time to roll back k tokens and re-advance
(what one rejected speculative step costs). Qwen3.5's real tokenizer (248K tokens) is not
available offline; the demo's has 4096 tokens, so mask times here are a lower bound.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEMO = Path(__file__).resolve().parents[1] / "mtplx" / "demo" / "tiny-qwen35-mtp"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 0},
        "license": {"enum": ["MIT", "Apache-2.0", "BSD-3-Clause"]},
        "dependencies": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"package": {"type": "string"}, "pinned": {"type": "boolean"},
                               "score": {"type": "number"}},
                "required": ["package", "pinned"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "version", "license", "dependencies"],
    "additionalProperties": False,
}
DOCUMENT = json.dumps({
    "name": "mtplx", "version": 3, "license": "MIT",
    "dependencies": [{"package": "mlx", "pinned": True, "score": 0.5},
                     {"package": "numpy", "pinned": False}, {"package": "click", "pinned": False}],
}, separators=(",", ":"))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def timed(fn, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure_llguidance(hf_tok, tokens: list[int]) -> dict:
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    text = (DEMO / "tokenizer.json").read_text()
    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(text, n_vocab=len(hf_tok), eos_token=[0, 2])
    tokenizer_s = time.perf_counter() - t
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    generic = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
    compile_s = timed(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0))
    generic_s = timed(lambda: llguidance.LLMatcher(lltok, generic, log_level=0))
    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    mask = allocate_token_bitmask(1, lltok.vocab_size)
    per_mask = []
    for tok in tokens:
        t = time.perf_counter()
        fill_next_token_bitmask(m, mask)
        per_mask.append(time.perf_counter() - t)
        assert m.consume_token(tok), m.get_error()
    rollback = {}
    m.reset()
    half = len(tokens) // 2
    m.consume_tokens(tokens[:half])
    for k in (1, 2, 4, 8):
        def step():
            assert m.rollback(k)
            m.consume_tokens(tokens[half - k: half])
        rollback[k] = timed(step, 50)
    return {"tokenizer": tokenizer_s, "compile": compile_s, "compile_generic": generic_s,
            "mask_median": statistics.median(per_mask), "mask_max": max(per_mask), "rollback": rollback}


def measure_xgrammar(hf_tok, tokens: list[int]) -> dict:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=len(hf_tok), stop_token_ids=[0, 2])
    tokenizer_s = time.perf_counter() - t
    schema = json.dumps(SCHEMA)
    # A fresh compiler each time: its cache would otherwise hide the compile cost.
    compile_s = timed(lambda: xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(schema))
    generic_s = timed(lambda: xgr.GrammarCompiler(info, cache_enabled=False).compile_builtin_json_grammar())
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema)
    m = xgr.GrammarMatcher(compiled, max_rollback_tokens=16)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    per_mask = []
    for tok in tokens:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        per_mask.append(time.perf_counter() - t)
        assert m.accept_token(tok)
    rollback = {}
    m.reset()
    half = len(tokens) // 2
    for tok in tokens[:half]:
        m.accept_token(tok)
    for k in (1, 2, 4, 8):
        def step():
            m.rollback(k)
            for tok in tokens[half - k: half]:
                m.accept_token(tok)
        rollback[k] = timed(step, 50)
    return {"tokenizer": tokenizer_s, "compile": compile_s, "compile_generic": generic_s,
            "mask_median": statistics.median(per_mask), "mask_max": max(per_mask), "rollback": rollback}


def main() -> None:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(DEMO))
    tokens = hf_tok.encode(DOCUMENT)
    print(f"demo tokenizer: {len(hf_tok)} tokens; document: {len(DOCUMENT)} chars, {len(tokens)} tokens")
    for name, fn in (("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)):
        try:
            r = fn(hf_tok, tokens)
        except ImportError as e:
            print(f"{name}: not importable ({e})")
            continue
        rb = ", ".join(f"k={k}: {ms(v)}" for k, v in r["rollback"].items())
        print(f"{name}: tokenizer view {ms(r['tokenizer'])}; compile schema {ms(r['compile'])}, "
              f"generic JSON {ms(r['compile_generic'])}; mask per token median {ms(r['mask_median'])} "
              f"(max {ms(r['mask_max'])}); rollback k + re-advance k: {rb}")
    sys.stdout.flush()


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
