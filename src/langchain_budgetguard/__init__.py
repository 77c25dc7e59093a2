"""langchain-budgetguard: hard spending limits for LangChain chat models.

    from langchain_budgetguard import BudgetGuard, Limit
    guarded = BudgetGuard(llm, limit=5.0)
"""

from .errors import (
    BudgetExceededError,
    BudgetGuardError,
    BudgetStoreUnavailableError,
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
    "GuardMisuseError",
    "IdentityError",
    "Refusal",
    "UnknownModelPriceError",
    "get_cost_callback",
]


def __getattr__(name: str):
    if name == "get_cost_callback":
        from .callbacks import get_cost_callback

        return get_cost_callback
    raise AttributeError(f"module 'langchain_budgetguard' has no attribute {name!r}")
