"""The request bodies of OpenAI's routes (:mod:`mtplx.server.openai` holds what is done with
them). Strict pydantic models: a value of the wrong type or a field mtplx does not know is a
400 naming it (:class:`~mtplx.server.core.StrictModel`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from mtplx.server.core import MAX_STOPS, StrictModel
from mtplx.server.http_errors import APIError


class ContentPart(StrictModel):
    type: str
    text: str | None = None
    # OpenAI's other parts (an image, audio, a file) are read here so that the route answers
    # "this model takes text only" (openai._message_dict), not "unrecognized argument" as for a typo.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON object, as the API returned it


class MessageToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted; Qwen's template has no place for it
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    reasoning_content: str | None = None  # assistant (vLLM's field; Qwen's template renders it)
    refusal: str | None = None  # accepted, as clients send back the assistant messages they got


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # refused when true: arguments are not constrained to the schema


class JsonSchemaFormat(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict[str, Any] | None:
        """OpenAI's shape, for :meth:`Core.compile_format` (which checks the schema, once);
        None for plain text."""
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise APIError(400, "'response_format.json_schema' goes with type 'json_schema', and only with it.",
                           param="response_format.json_schema", code="invalid_value")
        return None if self.type == "text" else self.model_dump(by_alias=True, exclude_none=True)


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(StrictModel):
    include_usage: bool = False


class CommonRequest(StrictModel):
    """The fields chat and completions requests share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, description="mtplx/vLLM extension; 0 or -1 disables it")
    min_p: float | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    depth: int | str | None = Field(None, description="mtplx extension: draft depth, 'auto' (adaptive), "
                                                       "0 = plain AR, or N drafts per step")
    lookup: int | str | None = Field(None, description="mtplx extension: drafts copied from the context, 0 "
                                     "(never), N (up to N tokens a step) or 'auto'")
    strict_greedy: bool | float | None = Field(None, description="mtplx extension: at temperature 0, re-decide a "
                                               "near-tie (top-2 margin <= 0.05, or this number) with a one-row "
                                               "pass so greedy MTP equals greedy AR on any backend")
    # Refused unless neutral: mtplx samples one choice from the model's own law.
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted, no effect: labels for OpenAI's bookkeeping.
    user: str | None = None


class ChatCompletionRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = Field(None, description="mtplx extension (also chat_template_kwargs)")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted: every call the model writes is returned
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None  # refused: thinking is on or off (enable_thinking)
    store: bool | None = None  # refused when true: nothing is stored
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(CommonRequest):
    prompt: str | list[int] | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None
