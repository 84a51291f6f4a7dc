"""The config section models: what each stage is configured by, validated at the edge.

Below every stage on purpose: stage modules (``transforms/``) import their section from here,
and the composition root (:mod:`pipeline.config`) assembles them into the whole :class:`Config`
with the cross-section rules. So layers point one way: ``pipeline`` imports ``transforms``,
never the reverse.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error that
names it instead of a silently ignored setting. The ``provider`` section is one model per
``provider.kind``, each defined beside its provider and joined by the registry into a union
discriminated by ``kind`` (:data:`~transforms.providers.ProviderConfig`, re-exported here), so a
key of another kind is refused too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from transforms.providers import ProviderConfig
from transforms.tokens import TOKENIZER_NAMES, is_tokenizer_file, unknown_tokenizer_message

__all__ = [
    "CacheConfig", "InputConfig", "LimitsConfig", "OutputConfig", "ProviderConfig",
    "RetryConfig", "SplitConfig", "ValidateConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    path: str | list[str]
    format: Literal["auto", "jsonl", "parquet", "csv", "text"] = "auto"
    id_field: str = "id"
    text_field: str = "text"
    metadata_fields: list[str] = Field(default_factory=list)
    # The field holding each record's image reference (a path relative to the record's file,
    # an fsspec URL, an http(s) URL or a data: URL); needs provider.multimodal: true.
    image_field: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    # Uncompressed JSONL and CSV files above this size are read in ranges of about this size by
    # several workers (Parquet: groups of row groups); compressed files are read whole.
    range_bytes: int = Field(64 * 1024 * 1024, gt=0)

    @property
    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        if (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
            raise ValueError("give at least one fsspec URL or glob")
        return v


class ValidateConfig(_Section):
    max_document_bytes: int = Field(10_000_000, gt=0)


class SplitConfig(_Section):
    max_tokens: int = Field(512, gt=0)
    overlap_tokens: int = Field(64, ge=0)
    # A built-in name, or the path or fsspec URL of the served model's Hugging Face
    # tokenizer.json; then max_tokens (and provider.max_input_tokens) are that model's tokens,
    # its special tokens included. pipeline.config loads it once to check it.
    tokenizer: str = "cl100k_base"

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, v: str) -> str:
        if v not in TOKENIZER_NAMES and not is_tokenizer_file(v):
            raise ValueError(unknown_tokenizer_message(v))
        return v

    @model_validator(mode="after")
    def _overlap_below_max(self) -> SplitConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens "
                f"({self.max_tokens})"
            )
        return self


class LimitsConfig(_Section):
    requests_per_minute: float = Field(3000, gt=0)
    tokens_per_minute: float = Field(1_000_000, gt=0)
    max_concurrency: int = Field(16, gt=0)
    # Worker processes sharing the budget: "auto" derives it from the Beam options.
    workers: int | Literal["auto"] = "auto"

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_above_zero(cls, v: Any) -> Any:
        # Each worker takes 1/workers of the budget: 0 would divide by zero and a negative count
        # would give a negative rate. One message for every wrong shape, not pydantic's two.
        if v == "auto":
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)  # from --set limits.workers=3
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be a whole number of worker processes, 1 or more, or 'auto'; "
                             f"got {v!r}")
        return v


class RetryConfig(_Section):
    max_attempts: int = Field(8, gt=0)
    max_wait_s: float = Field(120, gt=0)
    initial_wait_s: float = Field(1.0, gt=0)


class OutputConfig(_Section):
    path: str = "./out/run"
    include_text: bool = False
    rows_per_file: int = Field(100_000, gt=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    overwrite: bool = False


class CacheConfig(_Section):
    enabled: bool = True
    path: str | None = None
