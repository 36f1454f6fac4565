"""The request bodies of Anthropic's Messages routes (:mod:`mtplx.server.anthropic` holds what is
done with them). Strict pydantic models, as for OpenAI (:class:`~mtplx.server.core.StrictModel`):
what each field means to mtplx is decided here, once. A field Anthropic's API defines is honoured
where the model can honour it, accepted as advisory where it changes nothing for a local text model
(``ADVISORY`` lists them, for the server log and docs/agents.md), and a field neither API defines
stays a 400 naming it, so typos are still caught."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from mtplx.server.core import MAX_STOPS, StrictModel


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # accepted: a caching hint, no effect
    citations: list[dict[str, Any]] | None = None  # accepted only empty (checked below)


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolReferenceBlock(StrictModel):
    """A tool that a tool-search result names (Claude Code's deferred tools): rendered as text,
    since mtplx renders every tool into the prompt anyway."""

    type: Literal["tool_reference"]
    tool_name: str
    cache_control: dict[str, Any] | None = None


ResultBlock = Annotated[TextBlock | ToolReferenceBlock, Field(discriminator="type")]


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(StrictModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # accepted: mtplx signs nothing
    cache_control: dict[str, Any] | None = None


class RedactedThinkingBlock(StrictModel):
    """Reasoning another model encrypted: nothing mtplx can read, so it is dropped."""

    type: Literal["redacted_thinking"]
    data: str
    cache_control: dict[str, Any] | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                  Field(discriminator="type")]


class Message(StrictModel):
    # "system": context sent in the middle of a conversation (Claude Code's environment notes),
    # rendered as system context at its place (mtplx.server.anthropic._template_messages).
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class Tool(StrictModel):
    """A client tool (rendered into the prompt) or one of Anthropic's server tools (``type``
    such as ``web_search_20250305``, with its own fields), which a local server cannot run: those
    are left out of the prompt."""

    model_config = {"extra": "allow"}  # a server tool's own settings (max_uses, allowed_domains, ...)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # refused when true: the input is not constrained to the schema
    # Claude Code marks tools it would load on demand; mtplx renders every tool, so it changes nothing.
    defer_loading: bool | None = None
    input_examples: list[dict[str, Any]] | None = None  # accepted; Qwen's templates have no place for them

    @property
    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")

    @model_validator(mode="after")
    def _client_tool_fields(self) -> "Tool":
        # Only a server tool carries settings of its own: on a client tool an unknown field is
        # still a typo, and input_schema is what the model is shown.
        if self.is_client_tool:
            if self.model_extra:
                raise ValueError(f"Extra inputs are not permitted: {sorted(self.model_extra)[0]!r}")
            if self.input_schema is None:
                raise ValueError("Field required: 'input_schema'")
        return self


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(StrictModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None  # accepted: the reasoning stays in the text


class Metadata(StrictModel):
    user_id: str | None = None


class OutputFormat(StrictModel):
    """Structured outputs: the answer constrained to a JSON schema (the grammar of response_format)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictModel):
    # Claude's effort (low .. max): Qwen's templates have no control for it (thinking is on or
    # off, set by ``thinking``), so it is accepted and changes nothing.
    effort: Literal["low", "medium", "high", "max"] | None = None
    format: OutputFormat | None = None


class PromptRequest(StrictModel):
    """What Messages and count_tokens requests share: the prompt."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    # Advisory: how Anthropic's servers edit a long context (clearing old thinking or tool
    # results). mtplx renders the conversation it is sent, and Qwen's templates already drop past
    # thinking, so nothing is cleared here.
    context_management: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    mcp_servers: list[dict[str, Any]] | None = None  # refused when not empty: mtplx connects to no MCP server


class CountTokensRequest(PromptRequest):
    pass


class MessagesRequest(PromptRequest):
    max_tokens: int
    temperature: float | None = Field(None, ge=0.0, le=1.0)  # Anthropic's range (OpenAI's routes take more)
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    metadata: Metadata | None = None  # accepted: a label, no effect
    service_tier: str | None = None  # accepted: one model, one tier
    container: str | dict[str, Any] | None = None  # accepted: no code-execution container here
    inference_geo: str | None = None  # accepted: the model runs where the server runs
    # mtplx extensions, as on the OpenAI routes
    min_p: float | None = None
    seed: int | None = None
    depth: int | str | None = None  # mtplx extension: "auto", 0 = plain AR, or N
    lookup: int | str | None = None  # mtplx extension: drafts copied from the context, 0, N or "auto"
    strict_greedy: bool | float | None = None  # mtplx extension: true or a margin (mtplx.engine.strict)


# Fields accepted and ignored, with the reason the server logs (once per field) and the docs give.
ADVISORY = {
    "metadata": "a label for Anthropic's billing",
    "service_tier": "one model, one tier",
    "container": "no code-execution container on this server",
    "inference_geo": "the model runs where the server runs",
    "context_management": "the conversation is rendered as sent; Qwen's templates drop past thinking",
    "cache_control": "the prompt cache matches every prefix by itself",
    "defer_loading": "every tool is rendered into the prompt",
    "output_config.effort": "Qwen's templates have no effort control (thinking is on or off)",
    "thinking.display": "the reasoning stays in the text the template renders",
    "thinking.budget_tokens": "the model thinks until it stops; max_tokens still caps the answer",
    "signature": "mtplx signs no thinking",
    "input_examples": "Qwen's templates have no place for tool input examples",
}
