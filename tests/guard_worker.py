"""A worker process for the multi-process guard tests: ``python -m tests.guard_worker '<json spec>'``.

Each worker builds its own guard from the spec (the store URL, the budget's name and limit), the
way a separate service would, and talks to the test on stdin/stdout, one JSON object a line:

- ``{"mode": "spend", "calls": N, ...}``: prints ``{"ready": ...}`` once its guard has reached
  Redis, waits for a line on stdin (the test's "go", so that every worker starts at once), makes
  N calls and prints ``{"served": ..., "refused": ..., "errors": [...], "spans": [[t0, t1], ...]}``
  (wall-clock spans of the served calls, to show that they overlapped).
- ``{"mode": "hold", ...}``: reserves through the guard with a model that sleeps for a minute,
  then is expected to be killed (SIGKILL) while it holds the reservation.

The model is ``tests.fakes.UsageChat`` priced by ``PRICES`` with an exact estimator, so one call
reserves and costs exactly ``CALL_COST`` and its input alone costs ``INPUT_COST``.
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from typing import Any

from langchain_budgetguard import BudgetExceededError, BudgetGuard

from .fakes import ExactEstimator, UsageChat

# $40/MTok in, $50/MTok out: 1000 in + 1000 out = $0.09 a call, of which $0.04 is input.
PRICES = {"big": {"input": "40", "output": "50"}}
CALL_COST = Decimal("0.09")
INPUT_COST = Decimal("0.04")


def big(delay: float = 0.0) -> UsageChat:
    return UsageChat(model_name="big", input_tokens=1000, output_tokens=1000, max_tokens=1000, delay=delay)


def guard_for(spec: dict[str, Any], llm: Any = None) -> BudgetGuard:
    """The guard a worker (or the test, with ``llm=None``: a policy, for status) builds from a spec."""
    options: dict[str, Any] = {
        "limit": spec["limit"],
        "store": spec["url"],
        "name": spec["name"],
        "prices": PRICES,
        "estimator": ExactEstimator(1000),
    }
    for key in ("lease_seconds", "expired_hold"):
        if key in spec:
            options[key] = spec[key]
    return BudgetGuard(llm, **options)


def say(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def spend(spec: dict[str, Any]) -> None:
    guard = guard_for(spec, big(spec.get("delay", 0.0)))
    guard.status()  # connect and load the scripts before the start line
    say({"ready": True})
    if not sys.stdin.readline():
        return  # the test went away
    served = refused = 0
    errors: list[str] = []
    spans: list[list[float]] = []
    for _ in range(spec["calls"]):
        started = time.time()
        try:
            reply = guard.invoke("hi")
        except BudgetExceededError:
            refused += 1
            continue
        except Exception as exc:  # reported to the test, which fails on any
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        cost = reply.response_metadata["budgetguard"]["cost_usd"]
        if cost != CALL_COST:
            errors.append(f"a served call cost {cost}, expected {CALL_COST}")
        served += 1
        spans.append([started, time.time()])
    say({"served": served, "refused": refused, "errors": errors, "spans": spans})


def hold(spec: dict[str, Any]) -> None:
    guard = guard_for(spec, big(delay=60.0))
    say({"ready": True})
    guard.invoke("hi")  # reserves, then the model sleeps until the test kills this process
    say({"finished": True})  # only if nobody killed us


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    {"spend": spend, "hold": hold}[spec["mode"]](spec)


if __name__ == "__main__":
    main(sys.argv)
