"""The request bodies of the API (pydantic): OpenAI's shapes for embeddings and chat, ``{"model", "input"}``
for the encoder tasks. Every text field must be valid Unicode (a JSON lone surrogate is a 422 naming it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from lmforge.errors import UserError, unicode_problem


def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can encode: refuse them by name."""
    problem = unicode_problem(text)
    if problem is not None:
        raise UserError(f"invalid Unicode: {problem}")
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def param_path(loc: tuple) -> str:
    """A validation error's field as ``input.1``: the body's field names and list indices, without the
    names pydantic gives the branches of a union (``str``, ``list[...]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p != "body" and "[" not in p and p not in ("str", "list"))]
    return ".".join(parts)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class InputRequest(_Lenient):
    model: Text
    input: Text | list[Text | list[Text]] = Field(description="texts, or [text, text_pair] pairs (classify)")


class TranslateRequest(InputRequest):
    num_beams: int = Field(4, ge=1, le=8)
    max_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Lenient):
    model: Text
    input: Text | list[Text]
    encoding_format: Literal["float", "base64"] = "float"
    """base64: the float32 little-endian bytes of each vector, base64-encoded (what OpenAI's client asks for)."""


class Message(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Lenient):
    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64, description="sampling seed: the same reply for the same seed")
    n: int = Field(1, ge=1, le=1, description="one choice per request")


class CompletionRequest(_Lenient):
    """OpenAI's legacy completions: a prompt (text or token ids, one or several) continued, with the token
    log-probabilities of the prompt itself when ``echo`` (what lm-evaluation-harness's ``local-completions`` asks
    for to score log-likelihood tasks)."""

    model: Text
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="a text, texts, a list of token ids, or lists of token ids"
    )
    max_tokens: int = Field(16, ge=0, description="tokens generated (0 with echo: only the prompt is scored)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5, description="the most probable tokens listed at each position")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")


class ExplainRequest(_Lenient):
    model: Text
    input: Text | list[Text] = Field(description="a text, or [text, text_pair] (embedding models: two texts)")
    method: Literal["ig", "grad-x-input", "occlusion", "attention"] = "ig"
    label: Text | None = None
    """Classification: the label to explain (default: the predicted one)."""
    steps: int = Field(32, ge=1, le=64)
    """Integrated Gradients' steps (each one a forward and backward pass)."""
