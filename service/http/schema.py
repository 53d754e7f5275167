"""The HTTP API's request and response bodies: OpenAI's embeddings schema plus documented
extension fields. The models are the validator and the OpenAPI document at once.

`input` is only checked for its shape here (a string, or a list), and `task` for being a string;
each input and the task are checked by the engine's validator, the same as for gRPC, so an error
names `input[i]` or `task` the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from ..tasks import TASK_NAMES

_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
INPUT_SCHEMA = {
    "description": "A text, a list of texts, a list of token ids (one input) or a list of lists "
                   "of token ids. Texts go in as given unless `task` is set.",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ],
}


def _inputs(value: Any) -> list:
    """The request's inputs as a list: a string is one input, a list of numbers is one
    token-id input (a float in it, NaN included, is then refused as `input[0]`'s token id,
    not taken for an input of its own), any other list is a list of inputs (each checked by
    the engine)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(type(v) in (int, float) for v in value):
            return [value]
        return value
    raise PydanticCustomError(
        "input_type", "must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids")


Inputs = Annotated[Any, PlainValidator(_inputs), WithJsonSchema(INPUT_SCHEMA)]


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings. Fields OpenAI defines that are unknown here are ignored (and
    logged), as vLLM does."""

    model_config = ConfigDict(extra="allow")

    input: Inputs
    model: StrictStr | None = Field(
        None, description="The served model's id (see GET /v1/models) or its last path "
                          "component; omitted = the served model. Another name is 404 "
                          "model_not_found.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each embedding as little-endian float32 bytes, "
                             "base64-encoded (what the openai client asks for by default).")
    dimensions: StrictInt | None = Field(
        None, description="Matryoshka output size, in the model's range (GET /v1/models: "
                          "min_dimensions..max_dimensions); omitted = full size.")
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    task: StrictStr = Field(
        "none", json_schema_extra={"enum": list(TASK_NAMES)},
        description="Extension: the task prefix the model was trained with, added to "
                            "each text (`search_query` → `search_query: ` + text). `none` "
                            "(the default, as in OpenAI's API) uses the text as given. "
                            "Token-id inputs are used as given.")
    truncate: StrictBool = Field(
        True, description="Extension: cut texts longer than the model's 512 tokens (false: "
                          "such a text is an error naming it). Token-id inputs are never cut: "
                          "more than 512 ids is an error naming the input.")
    normalize: StrictBool = Field(
        True, description="Extension: L2-normalize each embedding (false: the raw mean-pooled "
                          "vector).")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="floats, or a base64 string of little-endian float32 values")
    truncated: bool = Field(description="Extension: the input was cut to the model's max "
                                        "tokens (truncate=true).")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    dimensions: int = Field(description="Extension: the full embedding size.")
    min_dimensions: int = Field(description="Extension: the smallest Matryoshka size.")
    max_dimensions: int = Field(description="Extension: the largest Matryoshka size.")
    max_tokens: int = Field(description="Extension: tokens per input (longer ones are cut).")
    max_inputs: int = Field(description="Extension: inputs per request.")
    precision: str = Field(description="Extension: the bundle's precision (fp32, int8, int4).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, "
                                  "rate_limit_error or server_error")
    param: str | None = Field(description="The request field at fault, e.g. `input[3]`.")
    code: str | None = Field(description="A stable machine-readable reason, e.g. "
                                         "`invalid_argument`, `queue_full`.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str = Field(description="`ok`, or why not: `loading`, `draining`, `no_worker`")
