"""Artifacts of the other MLX MTP runtime (artifact/legacy.py): the target's sampling defaults
are the model's own, not the draft sampler's (issue 21 review finding)."""

from __future__ import annotations

import json
import shutil

from mtplx.artifact.legacy import contract_from_other_runtime
from mtplx.artifact.loader import demo_path

LEGACY = {"arch_id": "qwen3_5-tiny", "mtp_depth_default": 2, "mtp_sidecar": "int4-g64-prequantized",
          "recommended_draft_sampler": {"temperature": 1.1, "top_p": 0.5, "top_k": 5}}


def test_target_defaults_come_from_the_model_and_the_draft_sampler_only_drafts(tmp_path):
    path = tmp_path / "legacy"
    shutil.copytree(demo_path(), path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8,
                                                             "top_k": 40}))
    defaults = contract_from_other_runtime(LEGACY, path).defaults
    assert defaults == {"depth": 2, "temperature": 0.7, "draft_temperature": 1.1, "top_p": 0.8, "top_k": 40}
    (path / "generation_config.json").unlink()
    contract = contract_from_other_runtime(LEGACY, path)
    assert contract.defaults == {"depth": 2, "temperature": 0.6, "draft_temperature": 1.1, "top_p": 0.95, "top_k": 20}
    assert any("mtplx's defaults" in line for line in contract.inferred)
