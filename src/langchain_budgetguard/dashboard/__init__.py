"""``budgetguard dashboard``: a read-only web page (and JSON) for one budget.

``data`` reads (through ``BudgetAdmin``, as the CLI does), ``pages`` and ``chart`` render HTML and
inline SVG, ``server`` serves both with the standard library's ``http.server``. Styles and the small
script ship as package data: nothing is fetched at run time.
"""

from .data import DashboardData, LedgerEntry, LedgerReader, ScopeIndexReader
from .server import DashboardServer, InsecureBindError, check_bind, is_loopback, make_server

__all__ = [
    "DashboardData",
    "DashboardServer",
    "InsecureBindError",
    "LedgerEntry",
    "LedgerReader",
    "ScopeIndexReader",
    "check_bind",
    "is_loopback",
    "make_server",
]
