"""The request body of OpenAI's Responses API, ``POST /v1/responses`` (:mod:`mtplx.server.responses`
holds what is done with it). Strict pydantic models (:class:`~mtplx.server.core.StrictModel`):
what each field means to mtplx is decided here, once. A field the Responses API defines is
honoured where a local text model can honour it, accepted as advisory where it changes nothing
here (``ADVISORY`` gives the reason the server logs once), or refused with a 400 that says why;
a field the API does not define stays a 400 naming it, so typos are still caught.
docs/responses.md lists every field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from mtplx.server.core import StrictModel

# -- input items ---------------------------------------------------------------------------------


class TextPart(StrictModel):
    """Text in a message: ``input_text`` (user, system, developer) or ``output_text`` (assistant)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = None  # output_text, as returned: accepted
    logprobs: list[dict[str, Any]] | None = None  # output_text, as returned: accepted


class RefusalPart(StrictModel):
    type: Literal["refusal"]
    refusal: str


class MediaPart(StrictModel):
    """An image, file or audio part: parsed so the 400 can say the model reads text only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_image", "input_file", "input_audio"]


Part = Annotated[TextPart | RefusalPart | MediaPart, Field(discriminator="type")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None  # an id the API returned with the item: accepted
    status: str | None = None
    phase: str | None = None  # assistant "commentary" / "final_answer": a label, no effect


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # a JSON object, as the API returned it
    namespace: str | None = None  # the namespace tool the function belongs to
    id: str | None = None
    status: str | None = None


class OutputTextPart(StrictModel):
    type: Literal["input_text", "output_text"]
    text: str


OutputPart = Annotated[OutputTextPart | MediaPart, Field(discriminator="type")]


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[OutputPart]
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(StrictModel):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None
    id: str | None = None
    status: str | None = None


class CustomToolCallOutputItem(StrictModel):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: str | list[OutputPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(StrictModel):
    """The model's past reasoning, as a client sends it back. Dropped: mtplx returns reasoning in
    the message text (as the template's ``<think>`` block), and Qwen's templates render past
    reasoning from there; ``encrypted_content`` is another server's ciphertext."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: str | None = None


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem | CustomToolCallItem
                      | CustomToolCallOutputItem | ReasoningItem, Field(discriminator="type")]


# -- tools ---------------------------------------------------------------------------------------

NAME = r"^[A-Za-z0-9_.:-]{1,128}$"


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # refused when true: the arguments are not constrained to the schema
    defer_loading: bool | None = None  # accepted: every tool is rendered into the prompt


class TextFormat(StrictModel):
    type: Literal["text"]


class GrammarFormat(StrictModel):
    type: Literal["grammar"]
    syntax: str
    definition: str


class CustomTool(StrictModel):
    """A freeform tool (its input is one string, e.g. a patch): rendered as a function with one
    string parameter ``input``, and a call to it answered as a ``custom_tool_call``."""

    type: Literal["custom"]
    name: str = Field(pattern=NAME)
    description: str | None = None
    format: Annotated[TextFormat | GrammarFormat, Field(discriminator="type")] | None = None
    defer_loading: bool | None = None


class NamespaceTool(StrictModel):
    """Tools grouped under a name; flattened into the prompt (see mtplx.server.responses)."""

    type: Literal["namespace"]
    name: str = Field(pattern=NAME)
    description: str | None = None
    tools: list[Annotated[FunctionTool | CustomTool, Field(discriminator="type")]] = Field(min_length=1)


# Tools OpenAI's servers run (or that need a computer, a shell protocol or an MCP connection of
# their own). mtplx cannot run them, so the model is not offered them; their settings are accepted
# as sent.
HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                "file_search", "code_interpreter", "computer", "computer_use", "computer_use_preview",
                "image_generation", "local_shell", "shell", "apply_patch", "mcp", "tool_search")


class HostedTool(StrictModel):
    model_config = ConfigDict(extra="allow")  # each hosted tool's own settings
    type: Literal[HOSTED_TOOLS]  # type: ignore[valid-type]


Tool = Annotated[FunctionTool | CustomTool | NamespaceTool | HostedTool, Field(discriminator="type")]


class NamedToolChoice(StrictModel):
    type: Literal["function", "custom"]
    name: str


class OtherToolChoice(StrictModel):
    """allowed_tools, a hosted tool, an MCP server: parsed so the 400 can name it."""

    model_config = ConfigDict(extra="allow")
    type: str


# -- the rest ------------------------------------------------------------------------------------


class Reasoning(StrictModel):
    # "none"/"minimal" turn the template's thinking off; any other effort leaves the template's
    # default (Qwen's templates have a thinking switch, not an effort dial).
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted: no summaries are written
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # its deprecated name


class JsonSchemaTextFormat(StrictModel):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class JsonObjectTextFormat(StrictModel):
    type: Literal["json_object"]


class Text(StrictModel):
    format: Annotated[TextFormat | JsonObjectTextFormat | JsonSchemaTextFormat, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted: no control for it

    def response_format(self) -> dict[str, Any] | None:
        """``format`` in the shape :meth:`~mtplx.server.core.Core.compile_format` reads (Chat
        Completions' response_format); None for plain text."""
        f = self.format
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return {"type": "json_object"}
        schema = {"name": f.name, "schema": f.schema_, "description": f.description, "strict": f.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


class StreamOptions(StrictModel):
    include_obfuscation: bool | None = None  # accepted: nothing is obfuscated on a local server


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice | OtherToolChoice,
                           Field(union_mode="left_to_right")] | None = None
    parallel_tool_calls: bool | None = None  # accepted: every call the model writes is returned
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: Reasoning | None = None
    text: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None  # refused unless 0: see /v1/chat/completions for logprobs
    # Stored state: nothing is stored here, so a request that builds on it is refused.
    store: bool | None = None  # accepted either way: nothing is stored
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    # Advisory (ADVISORY says why each changes nothing here).
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    metadata: dict[str, str] | None = None
    client_metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = None
    # mtplx extensions, as on the other routes
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    depth: int | str | None = None  # "auto", 0 = plain AR, or N drafts per step
    lookup: int | str | None = None  # drafts copied from the context: 0, N or "auto"
    strict_greedy: bool | float | None = None  # true or a margin (mtplx.engine.strict)

    @model_validator(mode="before")
    @classmethod
    def _message_type(cls, data: Any) -> Any:
        """An input item without a ``type`` is a message (the API's "easy input message")."""
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            data = {**data, "input": [{**item, "type": "message"} if isinstance(item, dict) and "type" not in item
                                      else item for item in data["input"]]}
        return data


# What the server includes when asked: nothing extra exists here (no encrypted reasoning, no
# search results, no images), so every includable but logprobs is accepted and adds nothing.
LOGPROBS_INCLUDE = "message.output_text.logprobs"

# Fields accepted and ignored, with the reason the server logs (once per field) and the docs give.
ADVISORY = {
    "store": "mtplx stores no responses (a later previous_response_id is refused)",
    "prompt_cache_key": "the prompt cache matches every prefix by itself",
    "prompt_cache_retention": "the prompt cache keeps what fits in --prompt-cache-gb",
    "metadata": "a label for OpenAI's bookkeeping",
    "client_metadata": "a label for the client's own bookkeeping",
    "user": "a label for OpenAI's bookkeeping",
    "safety_identifier": "a label for OpenAI's bookkeeping",
    "service_tier": "one model, one tier",
    "truncation": "mtplx never drops input; a prompt over the context is a 400",
    "max_tool_calls": "it limits hosted tools, which the model is not offered",
    "parallel_tool_calls": "every call the model writes is returned",
    "include": "nothing extra to include (no encrypted reasoning, search results or images)",
    "reasoning.summary": "no reasoning summaries are written; the reasoning stays in the text",
    "text.verbosity": "Qwen's templates have no verbosity control",
    "stream_options": "nothing is obfuscated on a local server",
    "defer_loading": "every tool is rendered into the prompt",
    "hosted tools": "web search, file search, code interpreter, MCP and other tools OpenAI's servers run "
                    "are left out of the prompt",
    "reasoning items": "past reasoning reaches the template through the message text",
}
