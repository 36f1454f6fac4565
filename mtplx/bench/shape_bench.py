"""`mtplx bench --shape`: compose the measured components to the full model, project speedups.

Composition of a component measured on N layers (engine path, ``measured``) to L layers:

    composed = fixed + (measured - fixed) * sum_k L_k * w_k / sum_k N_k * w_k

where ``fixed`` is the part that does not grow with depth and ``w_k`` the time of one layer of
kind k at the same token count (see ``components``). With N a multiple of the full-attention
interval the mix is the full model's and the factor is exactly L / N whatever the weights. The
draft step and the acceptance work do not depend on the trunk's depth (composed = measured);
the prefill with the head is the prefill without it plus the head's measured extra; commit
scales with the layer count.

Costs are in AR steps (the composed pipelined AR step). The bound per depth D is

    speedup(D) = E[tokens/step] / (verify(D+1) + sample(D+1) + D * draft + rollback)

and its memory-bound twin is E[tokens/step] * bytes(AR) / bytes(step) (``bytes_model``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx._version import __version__
from mtplx.model.shapes import ShapeBytes, accepted_law, memory_bound, rollback_bytes, tokens_per_step
from mtplx.bench.components import PREFILL, Timings
from mtplx.bench.roofline import DEFAULT_PEAK_TFLOPS, ShapeFlops, batch_projection
from mtplx.bench.roofline import table as roofline_table
from mtplx.bench.shape_models import Shape
from mtplx.model.shapes import FULL, LINEAR, WeightBytes, kind_counts


def compose(measured: float, fixed: float, per_layer: dict[str, float], n: dict[str, int], full: dict[str, int]) -> float:
    layers = max(measured - fixed, 0.0)
    have = sum(n[k] * per_layer[k] for k in n)
    want = sum(full[k] * per_layer[k] for k in full)
    return fixed + layers * (want / have if have > 0 else sum(full.values()) / sum(n.values()))


def composed_timings(t: Timings, n: dict[str, int], full: dict[str, int]) -> dict[str, Any]:
    """Every measured figure composed to the full depth (same keys as ``Timings.as_dict``)."""
    layer = lambda key: {k: t.per_layer[k][key] for k in (LINEAR, FULL)}  # noqa: E731
    scale = sum(full.values()) / sum(n.values())
    no_head = compose(t.prefill["without_head"], t.fixed[PREFILL], layer(PREFILL), n, full)
    return {
        "ar_step": compose(t.ar_step, t.fixed["ar"], layer("1"), n, full),
        "verify": {k: compose(v, t.fixed[k], layer(k), n, full) for k, v in t.verify.items()},
        "sample": dict(t.sample),
        "draft": t.draft,
        "draft_full_vocab": t.draft_full_vocab,
        "commit": {k: v * scale for k, v in t.commit.items()},
        "prefill": {"without_head": no_head, "with_head": no_head + t.prefill["with_head"] - t.prefill["without_head"]},
    }


def expected_commit(commit: dict[str, float], acceptance: list[float], depth: int) -> float:
    full = accepted_law(acceptance, depth)[-1]
    return full * commit["full"] + (1 - full) * commit["rollback"]


@dataclass
class ShapeReport:
    shape: Shape
    trunk_bits: int
    layers_measured: int
    prompt_tokens: int
    draft_vocab: int
    acceptance: list[float]
    acceptance_source: str
    max_depth: int
    bandwidth_gbs: float
    pending_cap: int
    repeats: int
    device: str
    timings: Timings
    weights: WeightBytes
    measured_config: dict[str, Any]
    end_to_end: dict[str, Any] | None = None
    saved: str | None = None
    notes: list[str] = field(default_factory=list)
    # --concurrency: B rows per step, projected as a roofline (see roofline.py).
    flops: ShapeFlops | None = None
    concurrency: list[int] | None = None
    batch_depths: list[int] | None = None
    peak_tflops: float = DEFAULT_PEAK_TFLOPS

    @property
    def full_counts(self) -> dict[str, int]:
        return kind_counts(self.shape.text_config)

    @property
    def measured_counts(self) -> dict[str, int]:
        return kind_counts(self.measured_config)

    def composed(self) -> dict[str, Any]:
        return composed_timings(self.timings, self.measured_counts, self.full_counts)

    def bytes_model(self) -> ShapeBytes:
        return ShapeBytes(self.shape.text_config, self.weights, self.full_counts, self.draft_vocab, self.prompt_tokens)

    def cost_model(self) -> dict[str, Any]:
        c = self.composed()
        ar = c["ar_step"]
        d = self.max_depth
        rb = rollback_bytes(self.bytes_model(), self.acceptance, self.pending_cap)
        out = {
            "ar_step_ms": round(ar, 3),
            "verify_steps": {k: round(v / ar, 4) for k, v in c["verify"].items()},
            "sample_steps": {k: round(v / ar, 4) for k, v in c["sample"].items()},
            "draft_steps": round(c["draft"] / ar, 4),
            "draft_vocab": self.draft_vocab,
            "rollback_steps": round(expected_commit(c["commit"], self.acceptance, d) / ar, 4),
            "rollback_bytes": round(rb["new"]),
            "rollback_bytes_old": round(rb["old"]),
            "prefill_ratio": round(c["prefill"]["with_head"] / c["prefill"]["without_head"], 4),
        }
        if c["draft_full_vocab"] is not None:
            out["draft_steps_full_vocab"] = round(c["draft_full_vocab"] / ar, 4)
        return out

    def projection(self) -> dict[str, float]:
        cm = self.cost_model()
        out = {}
        for d in range(1, self.max_depth + 1):
            t = str(d + 1)
            cost = cm["verify_steps"][t] + cm["sample_steps"][t] + d * cm["draft_steps"] + cm["rollback_steps"]
            out[str(d)] = round(tokens_per_step(self.acceptance, d) / cost, 4)
        return out

    def batch(self) -> dict[str, Any] | None:
        """The roofline projection of B rows per step (``--concurrency``), or None."""
        if not self.concurrency or self.flops is None:
            return None
        depths = self.batch_depths if self.batch_depths is not None else list(range(self.max_depth + 1))
        return batch_projection(self.bytes_model(), self.flops, self.acceptance, self.concurrency, depths,
                                self.pending_cap, self.bandwidth_gbs, self.peak_tflops)

    def as_dict(self) -> dict[str, Any]:
        batch = self.batch()
        mb = memory_bound(self.bytes_model(), self.acceptance, self.max_depth, self.pending_cap, self.bandwidth_gbs)
        composed = self.composed()
        return {
            "mtplx_version": __version__,
            "device": self.device,
            "platform": platform.platform(),
            "shape": self.shape.name,
            "text_config_source": self.shape.source,
            "trunk_bits": self.trunk_bits,
            "head": "body int4 g64, fc and norms bf16 (on the CPU expanded to bf16 at load, as the loader does)",
            "layers_measured": self.layers_measured,
            "layers_full": int(self.shape.text_config["num_hidden_layers"]),
            "layer_kinds": {"measured": self.measured_counts, "full": self.full_counts},
            "prompt_tokens": self.prompt_tokens,
            "repeats": self.repeats,
            "acceptance": self.acceptance,
            "acceptance_source": self.acceptance_source,
            "weight_bytes": self.weight_bytes(),
            "head_weight_bytes": self.weights.head,
            "weight_bytes_by_part": self.weights.as_dict(),
            "measured_ms": self.timings.as_dict(),
            "composed_ms": _rounded(composed),
            "cost_model": self.cost_model(),
            "projection": self.projection(),
            "projection_memory_bound": mb["projection"],
            "projection_memory_bound_old_rollback": mb["projection_old_rollback"],
            "auto_depth": {"this_machine": auto_choice(self.acceptance, self.projection()),
                           "memory_bound": auto_choice(self.acceptance, mb["projection"])},
            "bytes_model": mb,
            "projection_memory_bound_batch": batch["projection"] if batch else None,
            "batch_roofline": batch,
            "end_to_end": self.end_to_end,
            "saved": self.saved,
            "notes": self.notes,
        }

    def table(self) -> str:
        c, m, cm = self.composed(), self.timings, self.cost_model()
        n, L = self.layers_measured, int(self.shape.text_config["num_hidden_layers"])
        mb = memory_bound(self.bytes_model(), self.acceptance, self.max_depth, self.pending_cap, self.bandwidth_gbs)
        rows = [("AR step (pipelined)", m.ar_step, c["ar_step"], mb["ar_step_ms"])]
        for t in sorted(m.verify, key=int):
            rows.append((f"verify T={t}", m.verify[t], c["verify"][t], mb["verify_ms"].get(t)))
        for t in sorted(m.sample, key=int):
            rows.append((f"accept T={t}", m.sample[t], c["sample"][t], None))
        rows.append((f"draft step (K={self.draft_vocab})", m.draft, c["draft"], mb["draft_ms"]))
        if m.draft_full_vocab is not None:
            rows.append(("draft step (full vocab)", m.draft_full_vocab, c["draft_full_vocab"], None))
        rows.append(("commit, drafts rejected", m.commit["rollback"], c["commit"]["rollback"], None))
        rows.append(("commit, all accepted", m.commit["full"], c["commit"]["full"], None))
        rows.append((f"prefill {self.prompt_tokens}, AR", m.prefill["without_head"], c["prefill"]["without_head"], None))
        rows.append((f"prefill {self.prompt_tokens}, MTP", m.prefill["with_head"], c["prefill"]["with_head"], None))
        head = f"{'component':<26} {f'ms @ {n} layers':>15} {f'ms @ {L} layers':>15} {'AR steps':>9} {f'ms @ {self.bandwidth_gbs:g} GB/s':>16}"
        lines = [head, "-" * len(head)]
        for name, meas, comp, mem in rows:
            lines.append(f"{name:<26} {meas:>15.1f} {comp:>15.1f} {comp / c['ar_step']:>9.3f} "
                         f"{(f'{mem:.2f}' if mem is not None else '-'):>16}")
        proj, proj_mb = self.projection(), mb["projection"]
        lines.append("")
        lines.append(f"acceptance {', '.join(f'{a:.3f}' for a in self.acceptance)} ({self.acceptance_source})")
        for d in proj:
            lines.append(f"depth {d}: {tokens_per_step(self.acceptance, int(d)):.2f} tokens/step; bound {proj[d]:.2f}x on this "
                         f"machine, {proj_mb[d]:.2f}x memory-bound ({mb['projection_old_rollback'][d]:.2f}x with per-position "
                         f"state capture)")
        lines.append(f"depth auto would settle on depth {auto_choice(self.acceptance, proj)} on this machine and depth "
                     f"{auto_choice(self.acceptance, proj_mb)} memory-bound at this acceptance")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"rollback at T=3: {cm['rollback_bytes'] / 1e6:.2f} MB of state traffic (per-position capture: "
                     f"{cm['rollback_bytes_old'] / 1e6:.1f} MB); prefill MTP/AR {cm['prefill_ratio']:.3f}; "
                     f"trunk weights {self.weight_bytes() / 1e9:.2f} GB")
        batch = self.batch()
        if batch:
            lines += ["", roofline_table(batch)]
        return "\n".join(lines)

    def weight_bytes(self) -> int:
        return self.weights.trunk_total(self.full_counts, bool(self.shape.text_config["tie_word_embeddings"]))


def auto_choice(acceptance: list[float], projection: dict[str, float]) -> int:
    """The depth :class:`~mtplx.engine.policy.AutoDepth` picks given a projected speedup per
    depth (AR = 1) and the acceptance per position (cumulative, as `mtplx bench` reports it)."""
    from mtplx.engine.policy import AutoDepth, StepCosts

    depths = sorted(int(d) for d in projection)
    # A step's cost in AR steps, E(D) / speedup(D), as a verify cost with no separate draft.
    costs = StepCosts((1.0, *(tokens_per_step(acceptance, d) / projection[str(d)] for d in depths)), 0.0)
    conditional = [a / b if b > 0 else 0.0 for a, b in zip(acceptance, [1.0, *acceptance])]
    return AutoDepth(costs, conditional[: len(depths)], len(depths)).best()


def _rounded(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 3) if isinstance(d, float) else d


def parse_acceptance(text: str) -> list[float]:
    """'0.8,0.6' -> [0.8, 0.6]: P(draft k accepted) per position, non-increasing, in [0, 1]."""
    from mtplx.errors import MtplxError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v <= 1 for v in values) or any(b > a for a, b in zip(values, values[1:])):
        raise MtplxError(f"--acceptance {text!r} is not a list of per-position acceptance rates",
                         fix="pass P(draft k accepted) for k = 1, 2, ..., each in [0, 1] and none above the one "
                             "before it (as `mtplx bench` reports them), e.g. 0.8,0.65,0.5")
    return values


def demo_acceptance() -> tuple[list[float], str]:
    """The demo head's measured acceptance per position, recorded in the catalog."""
    from mtplx.artifact.catalog import catalog

    demo = next(m for m in catalog() if m["id"] == "demo")
    rec = demo["measured_acceptance"]
    return list(rec["acceptance"]), f"the demo head's, measured with `{rec['command']}`"


def end_to_end(path: str, prompt: list[int], timings: Timings, tokens: int, params,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the saved artifact at depth 2 through the engine and compare its per-step time with
    verify(3) + accept(3) + 2 drafts + commit from the components (same layers, no composition)."""
    import mtplx
    from mtplx.engine.speculative import Engine

    progress("end to end: the saved artifact at depth 2")
    model, _ = mtplx.load(path)
    engine = Engine(model, 2, params, seed=0)
    for _ in engine.generate(prompt, 4):  # warm-up
        pass
    engine = Engine(model, 2, params, seed=1)
    for _ in engine.generate(prompt, tokens):
        pass
    stats = engine.stats
    step_ms = 1000 * stats.decode_seconds / max(stats.steps - 1, 1)  # the first step is the prefill's token
    draft = timings.draft_full_vocab if model.draft_vocab is None and timings.draft_full_vocab is not None else timings.draft
    acc = stats.acceptance
    commit = expected_commit(timings.commit, acc, 2) if acc else timings.commit["rollback"]
    parts = timings.verify["3"] + timings.sample["3"] + 2 * draft + commit
    return {"artifact": path, "tokens": stats.generated, "steps": stats.steps, "acceptance": [round(a, 4) for a in acc],
            "step_ms": round(step_ms, 3), "components_ms": round(parts, 3), "ratio": round(step_ms / parts, 4),
            "within_10_percent": abs(step_ms / parts - 1) <= 0.10,
            "components": "verify(3) + accept(3) + 2 draft steps (vocabulary as loaded) + expected commit"}


def run_shape_bench(shape_ref: str, *, trunk_bits: int = 4, layers: int | None = None, prompt_tokens: int = 512,
                    acceptance: list[float] | None = None, max_depth: int | None = None, draft_vocab: int | None = None,
                    bandwidth_gbs: float = 400.0, repeats: int = 3, seed: int = 0, save: str | None = None,
                    e2e_tokens: int = 24, progress: Callable[[str], None] | None = None,
                    concurrency: list[int] | None = None, batch_depths: list[int] | None = None,
                    peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> ShapeReport:
    """Build the shape with random weights, time its components through the engine, compose."""
    import mlx.core as mx

    from mtplx.model.gated_delta_cache import FUSED_PENDING_CAP, pending_cap
    from mtplx.bench.components import measure, random_prompt
    from mtplx.core.device import device_name
    from mtplx.bench.shape_models import as_artifact, load_shape, random_modules, save_artifact
    from mtplx.engine.sampling import SamplingParams
    from mtplx.errors import MtplxError

    say = progress or (lambda _: None)
    shape = load_shape(shape_ref)
    tc = shape.text_config
    vocab = int(tc["vocab_size"])
    source = "given with --acceptance"
    if acceptance is None:
        acceptance, source = demo_acceptance()
    max_depth = max_depth or len(acceptance)
    if max_depth > len(acceptance):
        raise MtplxError(f"--max-depth {max_depth} needs the acceptance of {max_depth} draft positions, "
                         f"{len(acceptance)} given", fix="pass more values to --acceptance or a smaller --max-depth")
    if batch_depths is not None and max(batch_depths) > len(acceptance):
        raise MtplxError(f"--depths {','.join(map(str, batch_depths))} needs the acceptance of {max(batch_depths)} draft "
                         f"positions, {len(acceptance)} given", fix="pass more values to --acceptance or smaller --depths")
    if draft_vocab is None:
        draft_vocab = min(32768, vocab)
    if draft_vocab == 0 or draft_vocab >= vocab:
        draft_vocab = vocab
    if draft_vocab < 1:
        raise MtplxError(f"--draft-vocab {draft_vocab} is not a vocabulary size", fix="pass 0 (the full vocabulary) or K >= 1")
    if prompt_tokens < 2 or prompt_tokens >= int(tc.get("max_position_embeddings", 1 << 30)):
        raise MtplxError(f"--prompt-tokens {prompt_tokens} is out of range", fix="pass at least 2 tokens, within the context")

    say(f"building a random {shape.name} ({layers or tc['num_hidden_layers']} of {tc['num_hidden_layers']} layers)")
    mods = random_modules(shape, layers, seed)
    flops = ShapeFlops.from_modules(mods.trunk, mods.head, mods.text_config)  # before quantization
    saved = None
    if save:
        say(f"saving as an artifact in {save}")
        save_artifact(mods, save, trunk_bits)
        saved = str(save)
    model, weights = as_artifact(mods, trunk_bits)
    if draft_vocab < vocab:
        model.set_draft_vocab(mx.arange(draft_vocab))
    prompt = random_prompt(vocab, prompt_tokens, seed)
    params = SamplingParams()
    timings = measure(model, prompt, max_depth, repeats, params, progress=say)
    report = ShapeReport(shape=shape, trunk_bits=trunk_bits, layers_measured=int(mods.text_config["num_hidden_layers"]),
                         prompt_tokens=prompt_tokens, draft_vocab=draft_vocab, acceptance=acceptance,
                         acceptance_source=source, max_depth=max_depth, bandwidth_gbs=bandwidth_gbs,
                         pending_cap=FUSED_PENDING_CAP, repeats=repeats, device=device_name(),
                         timings=timings, weights=weights, measured_config=mods.text_config, saved=saved,
                         flops=flops, concurrency=concurrency, batch_depths=batch_depths, peak_tflops=peak_tflops)
    if kind_counts(mods.text_config)[LINEAR] * kind_counts(tc)[FULL] != kind_counts(mods.text_config)[FULL] * kind_counts(tc)[LINEAR]:
        report.notes.append("the measured layers do not have the full model's mix of layer kinds: their time was "
                            "apportioned between the kinds by one layer of each, timed alone (a multiple of the "
                            "full-attention interval avoids this)")
    cap_here = pending_cap(int(tc["linear_key_head_dim"]))
    if cap_here != FUSED_PENDING_CAP:
        report.notes.append(f"on this backend the engine applies an accepted prefix at commit (pending cap {cap_here}); "
                            f"the bytes model describes a fused recurrence kernel (cap {FUSED_PENDING_CAP})")
    if save and max_depth >= 2:
        del model, mods
        report.end_to_end = end_to_end(str(save), prompt, timings, e2e_tokens, params, say)
    return report


def project_shape(shape_ref: str, *, trunk_bits: int = 4, prompt_tokens: int = 512, acceptance: list[float] | None = None,
                  max_depth: int | None = None, draft_vocab: int | None = None, bandwidth_gbs: float = 400.0,
                  peak_tflops: float = DEFAULT_PEAK_TFLOPS, concurrency: list[int] | None = None,
                  batch_depths: list[int] | None = None) -> dict[str, Any]:
    """``--no-measure``: the memory-bound projections alone, from the stored bytes and the flops of
    the shape's modules, built lazily (no weight is computed and nothing is timed: seconds, at any size)."""
    from mtplx.bench.roofline import batch_projection
    from mtplx.bench.shape_models import lazy_modules, load_shape, stored_weight_bytes
    from mtplx.errors import MtplxError
    from mtplx.model.gated_delta_cache import FUSED_PENDING_CAP

    shape = load_shape(shape_ref)
    tc = shape.text_config
    source = "given with --acceptance"
    if acceptance is None:
        acceptance, source = demo_acceptance()
    max_depth = max_depth or len(acceptance)
    depths = batch_depths if batch_depths is not None else list(range(max_depth + 1))
    if max(max_depth, *depths) > len(acceptance):
        raise MtplxError(f"depth {max(max_depth, *depths)} needs the acceptance of that many draft positions, "
                         f"{len(acceptance)} given", fix="pass more values to --acceptance or smaller depths")
    vocab = int(tc["vocab_size"])
    draft_vocab = min(32768, vocab) if draft_vocab is None else (vocab if draft_vocab == 0 else min(draft_vocab, vocab))
    mods = lazy_modules(shape)
    flops = ShapeFlops.from_modules(mods.trunk, mods.head, mods.text_config)
    weights = stored_weight_bytes(mods, trunk_bits)
    model = ShapeBytes(tc, weights, kind_counts(tc), draft_vocab, prompt_tokens)
    mb = memory_bound(model, acceptance, max_depth, FUSED_PENDING_CAP, bandwidth_gbs)
    out = {"mtplx_version": __version__, "shape": shape.name, "text_config_source": shape.source,
           "trunk_bits": trunk_bits, "measured": False, "prompt_tokens": prompt_tokens, "draft_vocab": draft_vocab,
           "acceptance": acceptance, "acceptance_source": source,
           "weight_bytes": weights.trunk_total(kind_counts(tc), bool(tc["tie_word_embeddings"])),
           "weight_bytes_by_part": weights.as_dict(), "projection_memory_bound": mb["projection"],
           "projection_memory_bound_old_rollback": mb["projection_old_rollback"], "bytes_model": mb}
    if concurrency:
        batch = batch_projection(model, flops, acceptance, concurrency, depths, FUSED_PENDING_CAP, bandwidth_gbs,
                                 peak_tflops)
        out["projection_memory_bound_batch"], out["batch_roofline"] = batch["projection"], batch
    return out
