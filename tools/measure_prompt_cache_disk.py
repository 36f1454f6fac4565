"""Time to first token of a returning conversation served from the prompt cache's disk tier,
against a cold prefill of the same prompt (issue 29; docs/prompt-cache.md#disk-tier).

    python tools/measure_prompt_cache_disk.py                 # the fixture's bf16 graft, 2,000 tokens
    python tools/measure_prompt_cache_disk.py --model demo --tokens 1000

A first "server" prefills a PREFIX-token conversation and writes its cache to a fresh folder;
then, as after a restart, each repetition makes a new store (empty memory tier, same folder),
checks out the returning prompt (PREFIX tokens plus a new question) and generates its first
token. Cold: the same prompt without any cache. Both greedy, depth 0 (the first token is the
prefill's argmax either way), medians of --reps runs after a warm-up. The file is read from the
page cache (the script does not drop the machine's caches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mtplx
from mtplx.engine.prompt_cache import PromptCacheLRU, model_identity
from mtplx.engine.prompt_cache_disk import PromptCacheDisk

FIXTURE = Path(os.environ.get("MTPLX_FIXTURE", Path(__file__).resolve().parents[2] / "shared" / "fixtures" /
                              "tiny-qwen35-mtp"))
TEXT = ("The quick brown fox jumps over the lazy dog while the compiler checks every branch of the program. "
        "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n")


def first_token_s(model, tok, ids, cache=None) -> float:
    t0 = time.perf_counter()
    for _ in mtplx.stream_generate(model, tok, ids, max_tokens=1, temperature=0.0, depth=0, prompt_cache=cache):
        break
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model ref (default: the fixture grafted onto a bf16 trunk)")
    ap.add_argument("--tokens", type=int, default=2000, help="the conversation's cached prefix, in tokens")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtplx-disk-tier-"))
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> int:
    ref = args.model
    if ref is None:
        from mtplx.artifact.graft import graft

        ref = str(work / "tiny-bf16")
        graft(FIXTURE, ref, trunk_bits=16)
    model, tok = mtplx.load(ref)
    text = TEXT * (args.tokens // 20 + 1)
    prefix = tok.encode(text)[: args.tokens]
    returning = prefix + tok.encode(" Now write a Queue class.")
    first_token_s(model, tok, prefix[:64])  # warm-up: compiled kernels, lazily built state

    folder = work / "prompt-cache"
    disk = PromptCacheDisk(folder, model_identity(model), 1 << 34)
    store = PromptCacheLRU(model, 1 << 30, disk=disk)
    cache = store.checkout(prefix)
    first_token_s(model, tok, prefix, cache)
    store.checkin(cache)
    store.close()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    cold, warm, cached = [], [], 0
    for _ in range(args.reps):
        cold.append(first_token_s(model, tok, returning))
        restarted = PromptCacheLRU(model, 1 << 30, disk=PromptCacheDisk(folder, model_identity(model), 1 << 34))
        t0 = time.perf_counter()
        cache = restarted.checkout(returning)  # the load from disk is timed too
        cached = cache.reusable(returning)
        warm.append(time.perf_counter() - t0 + first_token_s(model, tok, returning, cache))
        restarted.close()
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"model {ref}: returning prompt {len(returning)} tokens, {cached} from disk ({size / 2**20:.1f} MiB "
          f"written)\nfirst token cold {c:.3f} s, from disk {w:.3f} s: {w / c:.3f}x "
          f"(medians of {args.reps}; cold {[round(x, 3) for x in cold]}, disk {[round(x, 3) for x in warm]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
