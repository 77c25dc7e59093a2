"""Pre-call token estimates, offline. INTERFACE STUB: the estimation work fills this in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from langchain_core.messages import BaseMessage

DEFAULT_MAX_OUTPUT_TOKENS = 4096


class Estimator(Protocol):
    mode: str

    def input_tokens(self, messages: Sequence[BaseMessage], tools: Sequence[Any] | None = None) -> int: ...
    def output_tokens(self, text: str) -> int: ...


def get_estimator(spec: str | Estimator) -> Estimator: ...


def max_output_tokens(model: Any, call_kwargs: Mapping[str, Any] | None = None) -> int | None: ...
