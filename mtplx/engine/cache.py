"""Commit and roll back the hybrid caches after a verify pass.

After verifying ``[y, d_1 .. d_D]`` with ``a`` drafts accepted, the trunk must hold exactly the
tokens up to ``d_a``:
- attention KV caches: trim the ``D - a`` rejected positions;
- Gated-DeltaNet conv and recurrent states: these are not positional, they are overwritten by
  every token; the verify pass kept the state before the block and the block's recurrence
  inputs, and the rollback goes back to that state with the accepted positions pending
  (mtplx/model/gated_delta_cache.py explains why no per-position state is stored);
- the MTP head's KV cache: rows for draft steps 2..D were built from the head's own hidden
  (speculative), so they are trimmed; the accepted positions are re-run from the trunk's
  verify hiddens at the next draft.
"""

from __future__ import annotations

import mlx.core as mx

from mtplx.model import kv_quant
from mtplx.model.mtp_model import ModelCache
from mtplx.model.trunk import VerifyRecord, materialize


def commit(cache: ModelCache, record: VerifyRecord, accepted: int, head: bool = True) -> None:
    """Keep the verified block up to position ``accepted`` (the first ``accepted`` drafts
    after the pending token) and drop the head rows the drafts after the first one added.
    ``accepted = -1`` keeps none of the block, not even the pending token (strict greedy
    decides it again with a one-row pass: engine/strict.py). ``head`` False: the drafts were
    copied from the context (engine/lookup.py), the head added no rows, none are dropped."""
    record.accepted = accepted  # a distributed leader sends this to the ranks holding the other layers
    drafted = record.tokens - 1
    rejected = drafted - accepted
    if rejected:
        for c in cache.trunk:
            if kv_quant.is_kv(c):  # quantized or not: each row is stored on its own, so a trim is exact
                c.trim(rejected)
        for i, layer_record in record.layers.items():
            layer_record.rollback(cache.trunk[i], keep=accepted + 1)
    if drafted > 1 and head:
        for c in cache.head:
            c.trim(drafted - 1)


def snapshot(cache: ModelCache) -> dict[str, mx.array]:
    """Every committed cache tensor by name, for comparing two caches (tests, debugging).
    Pending Gated-DeltaNet prefixes are applied first, so the states are the committed ones."""
    materialize(cache.trunk)
    out: dict[str, mx.array] = {}
    for name, caches in (("trunk", cache.trunk), ("head", cache.head)):
        for i, c in enumerate(caches):
            if kv_quant.is_kv(c):
                out.update({f"{name}.{i}.{k}": a for k, a in kv_quant.committed(c).items()})
            else:
                for j, arr in enumerate(c.cache):
                    if arr is not None:
                        out[f"{name}.{i}.state{j}"] = arr
    return out
