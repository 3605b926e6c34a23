"""OpenAI request bodies (the fields this server honours) and OpenAI-style errors."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error the client caused: answered as ``{"error": {...}}`` with a 4xx status."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": None}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept in ``model_extra``, where ``check_supported`` looks

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    # vLLM's extensions to the OpenAI API
    top_k: int = 0
    ignore_eos: bool = False


# OpenAI / vLLM fields this server does not implement yet: refused when set, never silently ignored.
UNSUPPORTED = {"logprobs": None, "top_logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
               "repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "best_of": None, "echo": False,
               "suffix": None, "logit_bias": None, "tools": None, "response_format": None}


def check_supported(body: BaseModel) -> None:
    extra = body.model_extra or {}
    for name, default in UNSUPPORTED.items():
        if extra.get(name, default) not in (None, default):
            raise OpenAIError(f"{name} is not supported by this server yet", param=name)


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
