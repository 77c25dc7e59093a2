"""What a model call that raised may have cost.

A provider bills a request it received and answered, whether or not the answer reached the caller.
A call that raised before its request went out (a refused connection, no free connection in the
pool) or that the provider refused (an HTTP error status) was not billed. One that timed out while
waiting for the answer, lost its connection mid-answer, or was cancelled (an ``asyncio`` task
cancelled by a timeout, ``KeyboardInterrupt``) may have been billed in full: nothing tells. Such a
call is charged its whole reservation, the most it can cost.
"""

from __future__ import annotations

import asyncio

__all__ = ["billed_unknown"]

# Names, not classes: httpx, openai, anthropic and requests name these alike, and none is a dependency.
_NOT_SENT = frozenset({"ConnectTimeout", "ConnectError", "PoolTimeout", "ProxyError", "SSLError",
                       "UnsupportedProtocol", "LocalProtocolError", "InvalidURL"})
_MAYBE_BILLED = frozenset({"ReadTimeout", "ReadError", "RemoteProtocolError", "APITimeoutError", "Timeout",
                           "ConnectionResetError", "IncompleteRead", "ChunkedEncodingError"})


def billed_unknown(error: BaseException | None) -> bool:
    """Whether a model call that raised ``error`` may have been billed without its answer reaching
    us: it timed out or was cancelled waiting for the answer, or its connection broke mid-answer.
    False for errors before the request went out (anywhere in the chain of causes) and for all other
    errors (the provider's refusals, the caller's bugs)."""
    if error is None:
        return False
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(chain) < 16:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(type(e).__name__ in _NOT_SENT for e in chain):
        return False
    return any(isinstance(e, (asyncio.CancelledError, KeyboardInterrupt, TimeoutError))
               or type(e).__name__ in _MAYBE_BILLED for e in chain)
