"""Whether a model's settings changed since the guard read them.

The guard resolves what it needs of a wrapped model once (its priced model, output cap, tools,
stored-context parameter, SDK clients) and keeps it for every call. LangChain models are mutable:
``llm.model_name = "gpt-4o"`` or ``llm.max_tokens = None`` after the guard read them would be
called as they are now but reserved as they were, so a call could spend far past its hold. A
``Snapshot`` keeps shallow copies of every settings container in the model's tree (each runnable's
``__dict__``, the dicts and lists in it, bindings, fallbacks and chain steps included); comparing
them with the live ones is a few pointer comparisons per call when nothing changed.
"""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import Runnable

__all__ = ["Snapshot"]

_DEPTH = 6  # nesting of settings containers followed (tools in a binding's kwargs: dict > list > dict > dict)


class Snapshot:
    """Shallow copies of the mutable containers under a runnable, to tell when any of them changed."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self._pairs = pairs

    @classmethod
    def of(cls, runnable: Any) -> Snapshot:
        pairs: list[tuple[Any, Any]] = []
        _collect(runnable, pairs, set(), 0)
        return cls(pairs)

    def unchanged(self) -> bool:
        """Whether every container still holds what it held (the same objects, by identity or ``==``)."""
        try:
            for live, frozen in self._pairs:
                if live != frozen:
                    return self._only_caches_moved()
        except Exception:  # noqa: BLE001 - a value whose == raises (an array) was replaced: read again
            return False
        return True

    def _only_caches_moved(self) -> bool:
        pairs = self._pairs
        for index, (live, frozen) in enumerate(pairs):
            if live != frozen:
                if not isinstance(frozen, _Fields) or _public(live) != _public(frozen):
                    return False
                pairs[index] = (live, _Fields(live))  # compare with what it caches now from here on
        return True

class _Fields(dict):  # type: ignore[type-arg]
    """A copy of a runnable's ``__dict__``: its settings and what LangChain caches on first use."""

    __slots__ = ()


def _public(fields: dict[str, Any]) -> dict[str, Any]:
    # What LangChain caches on first use (``_serialized``, a lazily built ``_client``) is not a
    # setting: a change there alone does not make the guard read the model again.
    return {key: value for key, value in fields.items() if not key.startswith("_")}

def _collect(value: Any, pairs: list[tuple[Any, Any]], seen: set[int], depth: int) -> None:
    if depth > _DEPTH or id(value) in seen:
        return
    if isinstance(value, dict):
        seen.add(id(value))
        pairs.append((value, dict(value)))
        for item in value.values():
            _collect(item, pairs, seen, depth + 1)
    elif isinstance(value, list):
        seen.add(id(value))
        pairs.append((value, list(value)))
        for item in value:
            _collect(item, pairs, seen, depth + 1)
    elif isinstance(value, tuple):
        for item in value:
            _collect(item, pairs, seen, depth + 1)
    elif isinstance(value, Runnable):  # a model, a binding, a fallback, a chain step: its own settings
        seen.add(id(value))
        fields = getattr(value, "__dict__", None)
        if isinstance(fields, dict):
            # What LangChain caches on first use (``_serialized``, a lazily built ``_client``) is
            # not a setting: kept out, so the first call does not make the guard read the model again.
            pairs.append((fields, _Fields(fields)))
            for item in fields.values():
                _collect(item, pairs, seen, 0)
    # anything else (an SDK client, a rate limiter, a tokenizer) counts by identity, in its container

