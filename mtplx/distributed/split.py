"""Which part of the model each rank holds.

The trunk's layers are split by mlx-lm's own ``pipeline`` (PipelineMixin): evenly, the lower
ranks taking the extra layers, rank size-1 the first layers and rank 0 the last. On top of
that, each rank keeps only the modules its passes use:

- rank 0 (the leader): its layers, the final norm, the lm_head, the embedding (the MTP head
  embeds the tokens it drafts from; with tied embeddings it is also the lm_head) and the MTP
  head. The final hidden state is computed here, and it is what both the lm_head and the head
  read, so drafting, acceptance and sampling cost no transfer at all; a step moves one hidden
  state per hop and a few token ids.
- rank size-1 (the first stage): its layers and the embedding.
- any rank in between: its layers only.

The cost is memory on rank 0: the lm_head (and, untied, a second vocabulary-sized matrix) and
the head (one decoder block plus ``fc``: ~3% of a 27B model in 4-bit). Where rank 0 is the
tighter machine, give it fewer layers with ``layers=`` (``--distributed-layers``).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mtplx.errors import MtplxError


def layer_split(num_layers: int, size: int, layers: Sequence[int] | None = None) -> list[int]:
    """Layers per rank, rank 0 first. Without ``layers``, mlx-lm's even split."""
    if layers is None:
        if num_layers < size:
            raise MtplxError(f"the trunk has {num_layers} layers, fewer than the {size} ranks of this run",
                             fix="run on fewer ranks")
        base, extra = divmod(num_layers, size)
        return [base + (1 if r < extra else 0) for r in range(size)]
    layers = list(layers)
    if len(layers) != size or any(n <= 0 for n in layers) or sum(layers) != num_layers:
        raise MtplxError(f"--distributed-layers {','.join(map(str, layers))} must give each of the {size} ranks at "
                         f"least one layer and add up to the trunk's {num_layers} layers",
                         fix="list one count per rank, rank 0 (the last layers) first")
    return layers


def hidden_dtype(embedding: nn.Module) -> mx.Dtype:
    """The dtype of the hidden states the ranks exchange: what the embedding produces."""
    return embedding.scales.dtype if hasattr(embedding, "scales") else embedding.weight.dtype


class PipelineSplit:
    """The ``split`` callback of the artifact loader: keep this rank's part of the model."""

    def __init__(self, group: mx.distributed.Group, layers: Sequence[int] | None = None):
        self.group = group
        self.layers = layers
        self.dtype: mx.Dtype | None = None
        self.hidden_size = 0
        self.layer_range = (0, 0)

    def __call__(self, model: nn.Module) -> bool:
        text = model.language_model
        body = text.model
        rank, size = self.group.rank(), self.group.size()
        if len(body.layers) < size:
            layer_split(len(body.layers), size)  # raises the clear error
        if self.layers is None:
            body.pipeline(self.group)
        elif "split" in inspect.signature(body.pipeline).parameters:
            body.pipeline(self.group, split=layer_split(len(body.layers), size, self.layers))
        else:
            raise MtplxError("this mlx-lm cannot split layers unevenly (its pipeline() takes no split)",
                             fix="upgrade mlx-lm, or drop --distributed-layers")
        self.layer_range = (body.start_idx, body.end_idx)
        self.dtype = hidden_dtype(body.embed_tokens)
        self.hidden_size = text.args.hidden_size
        leader, first = rank == 0, rank == size - 1
        if not leader and "lm_head" in text:
            del text["lm_head"]
        if not leader and not first:
            del body["embed_tokens"]
        return leader
