"""langchain-budgetguard: hard spending limits for LangChain chat models.

    from langchain_budgetguard import BudgetGuard, Limit
    guarded = BudgetGuard(llm, limit=5.0)
"""

from .errors import (
    BudgetExceededError,
    BudgetGuardError,
    BudgetStoreUnavailableError,
    CallIdReusedError,
    GuardMisuseError,
    IdentityError,
    Refusal,
    UnknownModelPriceError,
)
from .guard import BudgetGuard, CallCost
from .limits import Limit
from .policy import BudgetPolicy, LimitStatus
from .pricing import ModelPrice
from .usage import TokenUsage

__all__ = [
    "BudgetGuard",
    "BudgetPolicy",
    "Limit",
    "LimitStatus",
    "CallCost",
    "ModelPrice",
    "TokenUsage",
    "BudgetGuardError",
    "BudgetExceededError",
    "BudgetStoreUnavailableError",
    "CallIdReusedError",
    "GuardMisuseError",
    "IdentityError",
    "Refusal",
    "UnknownModelPriceError",
    "get_cost_callback",
    "enforce_budget",
    "BudgetMiddleware",
]


# Imported on first use: the callback module registers a LangChain hook, and the middleware needs
# the optional `langchain` package (pip install "langchain-budgetguard[agents]").
def __getattr__(name: str):
    if name == "get_cost_callback":
        from .callbacks import get_cost_callback

        return get_cost_callback
    if name == "enforce_budget":
        from .enforce import enforce_budget

        return enforce_budget
    if name == "BudgetMiddleware":
        from .middleware import BudgetMiddleware

        return BudgetMiddleware
    raise AttributeError(f"module 'langchain_budgetguard' has no attribute {name!r}")
