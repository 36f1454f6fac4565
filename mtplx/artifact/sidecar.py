"""The MTP sidecar (``mtp/weights.safetensors``): read it, check it, build the head it holds.

Both graft (which writes a sidecar and measures the head it makes) and the loader (which
refuses a sidecar that does not match its contract) need this, so it lives here and neither
of them imports the other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mtplx.artifact.contract import RuntimeContract
from mtplx.errors import ArtifactError
from mtplx.model.mtp_head import MTPHead, dequantize_linears

# The reduced draft vocabulary, when the artifact has one: sorted unique int32 token ids.
DRAFT_VOCAB_TENSOR = "mtp.draft_vocab_ids"
REBUILD = "rebuild the artifact with `mtplx graft --source ORIGINAL_CHECKPOINT --out DIR`, or download it again"


def read_tensors(file: Path, what: str = "sidecar") -> dict[str, mx.array]:
    """Every tensor of a safetensors file, or one clear error naming it (truncated, damaged)."""
    try:
        return dict(mx.load(str(file)))
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"the {what} cannot be read: it is truncated or damaged ({reason})", path=file,
                            fix=REBUILD) from None


def check_head_shapes(head: nn.Module, weights: dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(head.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing mtp.{missing[0]}" if missing else f"unexpected mtp.{unexpected[0]}"
        raise ArtifactError(f"the MTP tensors do not match a Qwen3.5 MTP head for this config ({what}; "
                            f"{len(missing)} missing, {len(unexpected)} unexpected)", path=where,
                            fix="check that config.json belongs to these weights")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ArtifactError(f"mtp.{name} has shape {tuple(value.shape)}, the config implies {tuple(expected[name].shape)}",
                                path=where, fix="check that config.json belongs to these weights")


def check_finite(weights: dict[str, mx.array], where: Path, fix: str = REBUILD) -> None:
    """Refuse NaN or Inf in any floating-point tensor (int4 weights are checked through their
    scales and biases). One evaluation over all tensors; the offender is named only on failure.
    A head with NaN weights would load, draft garbage and accept nothing, silently."""
    floats = [(n, v) for n, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not floats:
        return
    ok = mx.all(mx.stack([mx.isfinite(v).all() for _, v in floats]))
    if ok.item():
        return
    name = next(n for n, v in floats if not mx.isfinite(v).all().item())
    raise ArtifactError(f"the MTP head's tensor mtp.{name.removeprefix('mtp.')} holds NaN or Inf values", path=where,
                        fix=fix)


def build_head(contract: RuntimeContract, args: Any) -> MTPHead:
    """An empty head for the contract's architecture, quantized as the sidecar is stored."""
    arch = contract.data["architecture"]
    head = MTPHead(args, num_layers=arch["mtp_num_hidden_layers"], concat_order=contract.data["conventions"]["concat_order"])
    q = contract.sidecar_quantization
    if q["quantized"]:
        wanted = {name[len("mtp."):] for name in q["quantized"]}
        nn.quantize(head, group_size=q["group_size"], bits=q["bits"], class_predicate=lambda p, m: p in wanted)
    return head


def sidecar_file(path: Path, contract: RuntimeContract) -> Path:
    file = path / contract.sidecar_path
    if not file.is_file():
        raise ArtifactError(f"the sidecar {contract.sidecar_path} named by the contract is missing", path=path,
                            fix="re-download the artifact or rebuild it with `mtplx graft`")
    return file


def draft_vocab_ids(ids: mx.array | None, contract: RuntimeContract, vocab_size: int, file: Path) -> mx.array | None:
    """The sidecar's draft vocabulary, checked against the contract and the vocabulary."""
    described = contract.data["sidecar"].get("draft_vocab")
    if ids is None:
        if described:
            raise ArtifactError(f"the contract describes a draft vocabulary but the sidecar has no {DRAFT_VOCAB_TENSOR}",
                                path=file, fix=REBUILD)
        return None
    ids = ids.reshape(-1)
    problem = None
    if ids.dtype != mx.int32:
        problem = f"has dtype {ids.dtype}, not int32"
    elif ids.size == 0 or ids.min().item() < 0 or ids.max().item() >= vocab_size:
        problem = f"holds ids outside [0, {vocab_size})"
    elif ids.size > 1 and not (ids[1:] > ids[:-1]).all().item():
        problem = "is not sorted and unique"
    elif described and described["size"] != ids.size:
        problem = f"holds {ids.size} ids but the contract says {described['size']}"
    if problem:
        raise ArtifactError(f"the sidecar's {DRAFT_VOCAB_TENSOR} {problem}", path=file, fix=REBUILD)
    return ids


def check_layer_count(contract: RuntimeContract, file: Path) -> None:
    """The contract's ``mtp_num_hidden_layers`` against the layers the sidecar really holds (its
    header alone), before a head of that many layers is built: a contract saying 10^9 would
    otherwise allocate until memory runs out."""
    from mtplx.artifact.tensors import read_header

    indices = {int(m.group(1)) for name in read_header(file)[0] if (m := _LAYER.search(name))}
    declared = contract.data["architecture"]["mtp_num_hidden_layers"]
    if indices and declared != max(indices) + 1:
        raise ArtifactError(f"the contract's architecture.mtp_num_hidden_layers is {declared}, but the sidecar holds "
                            f"{max(indices) + 1} MTP layer(s)", path=contract.path or file,
                            fix="set it to the sidecar's layer count, or rebuild the artifact with `mtplx graft`")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_head(path: Path, contract: RuntimeContract, args: Any) -> tuple[MTPHead, mx.array | None]:
    """Build the head for the architecture, quantize as the contract says, load strictly.

    Returns the head and the sidecar's draft vocabulary ids (``None`` when it has none); the
    ids are kept out of the strict weight load since they are not a parameter of the head."""
    file = sidecar_file(path, contract)
    check_layer_count(contract, file)
    head = build_head(contract, args)
    weights = {k[len("mtp."):] if k.startswith("mtp.") else k: v for k, v in read_tensors(file).items()}
    ids = weights.pop(DRAFT_VOCAB_TENSOR.removeprefix("mtp."), None)
    for transform in contract.sidecar_transforms:
        weights = transform(weights)
    check_head_shapes(head, weights, file)
    check_finite(weights, file)
    head.load_weights(list(weights.items()), strict=True)
    if contract.sidecar_quantization["quantized"] and mx.default_device() == mx.cpu:
        dequantize_linears(head)
    mx.eval(head.parameters())
    return head, draft_vocab_ids(ids, contract, args.vocab_size, file)
