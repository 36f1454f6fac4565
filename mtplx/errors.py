"""User-facing errors.

Every failure a user can cause (a bad path, a contract that does not validate, a sidecar built
for another trunk) is raised as an :class:`MtplxError`: one paragraph that names the file, what
is wrong and how to fix it. The CLI prints it and exits non-zero; it never shows a traceback.
"""

from __future__ import annotations

from pathlib import Path


class MtplxError(Exception):
    """An error whose message is written for the person running mtplx."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.fix = fix
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message.rstrip("."))
        parts.append(".")
        if fix:
            parts.append(f" Fix: {fix.rstrip('.')}.")
        super().__init__("".join(parts))


class ContractError(MtplxError):
    """The runtime contract is missing, malformed or inconsistent."""


class ArtifactError(MtplxError):
    """An artifact's files do not match each other (shapes, hashes, missing tensors)."""


class UnsupportedModelError(MtplxError):
    """The checkpoint is not a Qwen3.5/3.6 model with an MTP head."""


class ContextOverflowError(MtplxError):
    """The prompt (with the chat history) does not leave room for one new token in the model's
    context. The chat catches this one to offer a new conversation instead of failing."""

    def __init__(self, prompt_tokens: int, context: int):
        self.prompt_tokens = prompt_tokens
        self.context = context
        super().__init__(f"the prompt has {prompt_tokens} tokens, at or over the model's context of {context}",
                         fix="shorten the prompt or the chat history")
