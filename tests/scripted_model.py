"""A real Qwen3.5 model (trunk + MTP head, run by the real engine) whose weights make it say one
fixed script, with the demo's tokenizer and the official Qwen3.5 chat template.

The server's tool-call path needs a model that actually emits tool-call text; the demo model,
trained on Python source, never does. Here every block's output projection is zero, so the
trunk's final hidden state is the embedding of the current token, and the untied lm_head maps
the embedding of script piece i to piece i+1 (and the last piece to <|im_end|>) with a wide
margin: decoding follows the script at any temperature, whatever the prompt. Each script piece
is one added token of the tokenizer, so its text is exact; pieces may cut a tool-call marker in
two, as real token boundaries do. The MTP head keeps random weights: speculation stays exact
whatever it drafts, so the output is the script at every depth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.qwen3_5 import Model, ModelArgs, TextModelArgs
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tiny_models import tiny_text_config

from mtplx.model.mtp_head import MTPHead
from mtplx.model.mtp_model import MTPModel
from mtplx.model.trunk import Trunk

DEMO = Path(__file__).resolve().parents[1] / "mtplx" / "demo" / "tiny-qwen35-mtp"
# The demo ships the official Qwen3.5 chat template (renders tools; Apache-2.0, from Qwen/Qwen3.5-*).
TEMPLATE = DEMO / "chat_template.jinja"
IM_END = 2
# The generation prompt ends with "<think>\n" (thinking on) or "<think>\n\n</think>\n\n" (off):
# both last tokens start the script.
TRIGGERS = ("\n", "\n\n")

# What Qwen3.5 writes for two tool calls after a sentence (the official template's format).
TOOL_SCRIPT = [
    "Let me check.",
    "\n\n<tool",
    "_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    "</function>\n</tool",
    "_call>\n<tool_call>\n<function=get_time>\n<parameter=zone>\nEurope/Paris\n</parameter>\n</function>\n",
    "</tool_call>",
]
TOOL_CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "Europe/Paris"})]
TOOL_TEXT = "Let me check."


def scripted_model(tmp: Path, script: list[str] = TOOL_SCRIPT) -> tuple[MTPModel, object]:
    """(model, tokenizer) saying ``script`` after any chat prompt; files are written to ``tmp``."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, tmp / name)
    shutil.copy(TEMPLATE, tmp / "chat_template.jinja")
    tok_json = json.loads((tmp / "tokenizer.json").read_text())
    base = len(tok_json["model"]["vocab"])
    ids = [base + i for i in range(len(script))]
    tok_json["added_tokens"] += [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": False} for i, piece in zip(ids, script)]
    (tmp / "tokenizer.json").write_text(json.dumps(tok_json))
    tokenizer = load_tokenizer(tmp, eos_token_ids=[IM_END])
    triggers = [tokenizer.encode(t)[-1] for t in TRIGGERS]

    config = tiny_text_config(base + len(script))
    config.update(tie_word_embeddings=False, max_position_embeddings=4096)
    mx.random.seed(0)
    trunk = Model(ModelArgs(model_type="qwen3_5", text_config=config))
    head = MTPHead(TextModelArgs.from_dict(config))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    params = dict(tree_flatten(trunk.parameters()))
    for key, value in params.items():
        if key.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            params[key] = mx.zeros_like(value)  # blocks add nothing: the hidden is the embedding
    # Token -> a state (a basis direction); state s -> the next script token.
    embed = mx.zeros((vocab, hidden))
    lm_head = mx.zeros((vocab, hidden))
    sources = [triggers, *[[i] for i in ids]]
    targets = ids + [IM_END]
    for state, (src, dst) in enumerate(zip(sources, targets)):
        for t in src:
            embed[t, state] = 1.0
        lm_head[dst, state] = 60.0
    params["language_model.model.embed_tokens.weight"] = embed
    params["language_model.lm_head.weight"] = lm_head
    params["language_model.model.norm.weight"] = mx.ones((hidden,))
    trunk.update(tree_unflatten(list(params.items())))
    mx.eval(trunk.parameters(), head.parameters())
    return MTPModel(Trunk(trunk), head, contract=None), tokenizer
