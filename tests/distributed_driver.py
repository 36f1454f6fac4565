"""Run by every rank of tests/test_distributed.py (under mlx.launch): many generations in one
launch. Usage: ``distributed_driver.py OUT.json SPEC_JSON``.

SPEC: {"cases": [{"ref": ..., "prompt": ..., "tokens": N, "temperature": t, "depth": d,
"seed": s}, ...]}. Rank 0 writes, per case, the tokens and step counts, and per model every
rank's statistics (layer range, weights held, passes); the other ranks serve rank 0.
"""

from __future__ import annotations

import json
import sys
from itertools import groupby

from mtplx import distributed
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine


def main() -> None:
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    try:
        link = distributed.join(timeout=120)
    except distributed.DistributedError as e:
        if "no distributed backend could start" in str(e):
            print(f"MTPLX-SKIP {e}", flush=True)
            return
        raise
    results: dict = {"cases": [], "ranks": {}}
    for ref, cases in groupby(spec["cases"], key=lambda c: c["ref"]):
        model, tokenizer = distributed.load(link, ref)
        if link.rank != 0:
            distributed.follow(model)
            continue
        for case in cases:
            engine = Engine(model, case["depth"], SamplingParams(temperature=case["temperature"]), seed=case["seed"])
            tokens = [t for step in engine.generate(tokenizer.encode(case["prompt"]), case["tokens"]) for t in step.tokens]
            results["cases"].append({**case, "output": tokens, "steps": engine.stats.steps})
        results["ranks"][ref] = [{"rank": s.rank, "layers": list(s.layers), "weights_mib": s.weights_mib,
                                  "step_passes": s.counters.passes["step"]}
                                 for s in model.trunk.stage.gather_stats()]
        distributed.stop(model)
    if link.rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
