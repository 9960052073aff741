"""The published request and response models (OpenAPI): what clients and fuzzers read.

Requests are validated by ``requests.parse`` (which answers in OpenAI's error format); these models
describe the same contract for /openapi.json and are checked against the parser in the tests.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

StopString = Annotated[str, Field(min_length=1, max_length=256)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] = Field(
        description="a string or a non-empty list of text parts (joined by newlines)")


class DraftwiseRequest(BaseModel):
    """The extension field: the method for this request and its options (`draftwise methods` lists them)."""
    model_config = ConfigDict(extra="forbid")
    method: str | None = Field(None, description="a method name; default: the server's --method")
    method_opts: dict[str, Any] | None = Field(None, description="the method's options; file options name only "
                                               "files the server offers")


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ResponseFormat(BaseModel):
    type: Literal["text"]


class _Common(BaseModel):
    model: str | None = Field(None, description="the served model's id, or 'default'")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="default: the rest of the context")
    temperature: float | None = Field(0.0, ge=0, le=2, description="0 (greedy) or in [0.001, 2]")
    top_p: float | None = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="up to 4 non-empty strings of at most 256 characters")
    stream: bool | None = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    n: int | None = Field(1, ge=1, le=1)
    presence_penalty: float | None = Field(0.0, ge=0, le=0)
    frequency_penalty: float | None = Field(0.0, ge=0, le=0)
    draftwise: DraftwiseRequest | None = None


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DraftwiseStats(BaseModel):
    method: str
    tau: float = Field(description="tokens per target pass")
    tokens_per_s: float
    target_passes: int
    stopped: str = Field(description="stop | length | deadline | cancelled")
    sources: dict[str, int] = Field(default_factory=dict, description="accepted draft tokens per source (auto)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    draftwise: DraftwiseStats


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    draftwise: DraftwiseStats


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queued: int
    busy: bool


REQUESTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
RESPONSES = {"/v1/chat/completions": ChatCompletion, "/v1/completions": Completion}
