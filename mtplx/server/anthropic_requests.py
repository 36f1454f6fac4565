"""The request bodies of Anthropic's Messages routes (:mod:`mtplx.server.anthropic` holds what is
done with them). Strict pydantic models, as for OpenAI (:class:`~mtplx.server.core.StrictModel`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

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


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(StrictModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # accepted: mtplx signs nothing
    cache_control: dict[str, Any] | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # refused when true: the input is not constrained to the schema


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


class PromptRequest(StrictModel):
    """What Messages and count_tokens requests share: the prompt."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class CountTokensRequest(PromptRequest):
    pass


class MessagesRequest(PromptRequest):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    metadata: Metadata | None = None  # accepted: a label, no effect
    service_tier: str | None = None  # accepted: one model, one tier
    # mtplx extensions, as on the OpenAI routes
    min_p: float | None = None
    seed: int | None = None
    depth: int | str | None = None  # mtplx extension: "auto", 0 = plain AR, or N
    strict_greedy: bool | float | None = None  # mtplx extension: true or a margin (mtplx.engine.strict)
