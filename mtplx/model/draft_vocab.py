"""A reduced draft vocabulary: the head projects onto K chosen token ids instead of all V.

The draft step pays for the shared lm_head over the whole vocabulary (248,320 rows on
Qwen3.5), which at small model sizes is most of its cost. Drafting from the K most frequent
tokens keeps decoding exact: the draft law q is zero outside the subset, the same q enters the
acceptance ratio and the residual norm(max(0, p - q)), and the residual covers every token the
subset lacks (FR-Spec makes the same argument).

The rows are gathered once, as stored: a quantized lm_head (or tied quantized embedding) keeps
its packed weights, scales and biases; a bf16 one its rows. On MLX's CPU backend, where
quantized matmuls run compute-bound, the gathered rows are dequantized to bf16 once, as the
head's body linears are (see :func:`mtplx.model.mtp_head.dequantize_linears`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class DraftVocab:
    """K token ids (sorted, unique, int32) and the lm_head rows that score them."""

    def __init__(self, ids: mx.array, projection: nn.Module):
        ids = mx.array(ids).astype(mx.int32).reshape(-1)
        self.ids = ids
        self.size = int(ids.shape[0])
        weight = projection["weight"][ids]
        if "scales" in projection:
            scales = projection["scales"][ids]
            biases = projection["biases"][ids] if "biases" in projection else None
            bits, group_size = projection.bits, projection.group_size
            mode = getattr(projection, "mode", "affine")
            if mx.default_device() == mx.cpu:
                weight = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
                self._weight, self._quant = weight.astype(mx.bfloat16), None
            else:
                self._weight, self._quant = weight, (scales, biases, group_size, bits, mode)
        else:
            self._weight, self._quant = weight, None
        mx.eval(self.ids, *self._arrays())

    def _arrays(self) -> list[mx.array]:
        extra = [a for a in self._quant[:2] if a is not None] if self._quant else []
        return [self._weight, *extra]

    @property
    def nbytes(self) -> int:
        """Bytes a draft step reads for the projection."""
        return sum(a.nbytes for a in self._arrays())

    def __call__(self, hidden: mx.array) -> mx.array:
        """Logits over the subset, ``[..., K]``; column j scores token ``ids[j]``."""
        if self._quant is None:
            return hidden @ self._weight.T
        scales, biases, group_size, bits, mode = self._quant
        return mx.quantized_matmul(hidden, self._weight, scales=scales, biases=biases, transpose=True,
                                   group_size=group_size, bits=bits, mode=mode)

    def scatter(self, probs: mx.array, vocab_size: int) -> mx.array:
        """A law over the subset ``[N, K]`` as a law over the whole vocabulary ``[N, V]``
        (zero outside the subset): the q the acceptance test and the residual must see."""
        dense = mx.zeros((probs.shape[0], vocab_size), dtype=probs.dtype)
        return mx.put_along_axis(dense, mx.broadcast_to(self.ids[None], probs.shape), probs, axis=-1)

    def token_ids(self, columns: mx.array) -> mx.array:
        """Sampled subset columns -> vocabulary token ids."""
        return self.ids[columns]
