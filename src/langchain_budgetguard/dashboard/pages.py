"""The dashboard's HTML: one function per page, from the data of ``data.py``.

Every value is escaped; every amount is printed with ``exact`` (as the CLI prints it). Tables,
sorting, searching and paging are plain links and GET forms: they work without JavaScript.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from html import escape
from importlib.resources import files
from string import Template
from urllib.parse import quote, urlencode

from ..limits import GLOBAL
from ..overrides import LimitRow
from ..policy import LimitStatus
from .chart import spend_chart
from .data import LEDGER_MISSING, PAGE_SIZES, EventsPage, IdPage, LedgerEntry, ScopePage, exact, used_percent

__all__ = ["layout", "limits_html", "scope_html", "id_html", "events_html", "error_html", "scope_url", "id_url"]

_HEADERS = (("id", "id", False), ("used", "used", True), ("limit", "limit", True), ("spent", "spent", True),
            ("held", "held", True), ("remaining", "remaining", True), ("resets", "resets at", False))


@lru_cache(maxsize=1)
def _template() -> Template:
    return Template(files(__package__).joinpath("templates/layout.html").read_text("utf-8"))


def usd(value: Decimal | None) -> str:
    return "-" if value is None else "$" + (exact(value) or "0")


def percent(status: LimitStatus) -> str:
    """As ``budgetguard status`` prints it: one decimal, ``100%`` for a $0 limit."""
    value = used_percent(status)
    return "100%" if value is None else f"{value:.1f}%"


def _when(value: datetime | None) -> str:
    return value.isoformat() if value else "never"


def scope_url(scope: str, **params: object) -> str:
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"/scope/{quote(scope, safe='')}" + (f"?{query}" if query else "")


def id_url(scope: str, scope_id: str) -> str:
    return f"/id/{quote(scope, safe='')}?{urlencode({'id': scope_id})}"


def layout(*, title: str, body: str, budget: str, store: str, scopes: Sequence[str], here: str, api: str) -> str:
    links = [("/", "limits"), *((scope_url(s), s) for s in scopes), ("/events", "refusals & alerts")]
    here_attr = ' class="here"'
    nav = "".join(f'<a href="{escape(href)}"{here_attr if href == here else ""}>{escape(label)}</a>'
                  for href, label in links)
    return _template().substitute(title=escape(title), body=body, budget=escape(budget), store=escape(store),
                                  nav=nav, api=escape(api),
                                  now=escape(datetime.now(timezone.utc).isoformat(timespec="seconds")))


def _bar(status: LimitStatus) -> str:
    value = used_percent(status)
    width = Decimal(100) if value is None else min(max(value, Decimal(0)), Decimal(100))
    level = "bad" if width >= 100 else "warn" if width >= 80 else ""
    return f'<span class="bar"><span class="{level}" style="width:{width:.0f}%"></span></span>'


# -- pages ------------------------------------------------------------------------------------


def limits_html(rows: Sequence[LimitRow], source: str) -> str:
    head = "".join(f"<th{' class=num' if n else ''}>{h}</th>" for h, n in (
        ("scope", False), ("id", False), ("window", False), ("configured", True), ("config override", True),
        ("store override", True), ("in force", True), ("from", False)))
    body = []
    for r in rows:
        who = "-" if r.per == GLOBAL else (r.scope_id or "* (every id)")
        tz = "" if r.tz == "UTC" else f" ({escape(r.tz)})"
        cells = [escape(r.per), escape(who), escape(r.window) + tz]
        nums = [usd(r.configured), usd(r.config_override), usd(r.store_override), usd(r.effective)]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="num">{escape(n)}</td>' for n in nums)
                    + f"<td>{escape(r.source)}</td></tr>")
    intro = (f'<p class="muted">The limits of {escape(source or "the config")}, the overrides in its '
             "[[overrides]] and the live overrides in the store (<code>budgetguard limit set</code>). "
             "The store's override for an id wins, then the config's, then the store's for every id, "
             "then the limit itself.</p>")
    return intro + f'<table id="limits"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def scope_html(page: ScopePage) -> str:
    def link(sort: str, label: str, numeric: bool) -> str:
        descending = (not page.descending) if page.sort == sort else numeric  # first click: heaviest first
        href = scope_url(page.scope, window=page.window, q=page.search, sort=sort,
                         order="desc" if descending else "asc", per_page=page.per_page)
        arrow = (" ▼" if page.descending else " ▲") if page.sort == sort else ""
        css = ' class="sorted"' if page.sort == sort else ""
        return (f'<th{" class=num" if numeric else ""}><a{css} data-sort="{sort}" href="{escape(href)}">'
                f"{escape(label)}{arrow}</a></th>")

    windows = "".join(f'<option value="{escape(x.window)}"{" selected" if x.window == page.window else ""}>'
                      f"per {escape(x.window)}</option>" for x in page.limits)
    sizes = "".join(f'<option value="{n}"{" selected" if n == page.per_page else ""}>{n} a page</option>'
                    for n in PAGE_SIZES)
    controls = (
        f'<form class="controls" method="get" action="{escape(scope_url(page.scope))}">'
        f'<input type="search" name="q" value="{escape(page.search)}" placeholder="id contains…" '
        f'aria-label="search ids">'
        f'<select name="window" aria-label="window">{windows}</select>'
        f'<select name="per_page" aria-label="page size">{sizes}</select>'
        f'<input type="hidden" name="sort" value="{escape(page.sort)}">'
        f'<input type="hidden" name="order" value="{"desc" if page.descending else "asc"}">'
        '<button type="submit">show</button></form>')
    summary = (f'<p class="muted" id="summary">{page.total} of {page.all_ids} {escape(page.scope)} ids with a '
               f"counter in {escape(page.window)} {escape(page.window_label)}"
               + (f" match “{escape(page.search)}”" if page.search else "")
               + f"; page {page.page} of {page.pages}.</p>")
    head = "".join(link(s, label, n) for s, label, n in _HEADERS)
    rows = []
    for s in page.rows:
        over = ' class="over"' if s.remaining <= 0 else ""
        sid = s.scope_id or "-"
        rows.append(
            f'<tr{over} data-id="{escape(sid)}"><td><a href="{escape(id_url(page.scope, sid))}">{escape(sid)}</a></td>'
            f'<td class="num">{_bar(s)}{escape(percent(s))}</td><td class="num">{escape(usd(s.limit))}</td>'
            f'<td class="num">{escape(usd(s.spent))}</td><td class="num">{escape(usd(s.held))}</td>'
            f'<td class="num">{escape(usd(s.remaining))}</td><td>{escape(_when(s.resets_at))}</td></tr>')
    table = (f'<table id="scope"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
             if rows else '<p id="empty">No id of this scope matches in this window.</p>')

    def pager_link(n: int, label: str, rel: str) -> str:
        href = scope_url(page.scope, window=page.window, q=page.search, sort=page.sort,
                         order="desc" if page.descending else "asc", page=n, per_page=page.per_page)
        return f'<a rel="{rel}" href="{escape(href)}">{label}</a>'

    pager = ['<nav class="pager">']
    if page.page > 1:
        pager.append(pager_link(1, "« first", "first") + pager_link(page.page - 1, "‹ previous", "prev"))
    pager.append(f"<span>page {page.page} of {page.pages}</span>")
    if page.page < page.pages:
        pager.append(pager_link(page.page + 1, "next ›", "next") + pager_link(page.pages, "last »", "last"))
    pager.append("</nav>")
    how = ("" if page.source == "index" else
           '<p class="muted">Ids are found by a SCAN of the store\'s keyspace (cost grows with the keyspace); '
           "the scope index of issue 14 replaces it.</p>")
    return controls + summary + table + "".join(pager) + how


def _statuses_table(statuses: Sequence[LimitStatus]) -> str:
    head = ("<tr><th>scope</th><th>id</th><th>window</th><th class=num>limit</th><th class=num>spent</th>"
            "<th class=num>held</th><th class=num>remaining</th><th class=num>used</th><th>resets at</th></tr>")
    rows = "".join(
        f'<tr{" class=over" if s.remaining <= 0 else ""}><td>{escape(s.scope)}</td><td>{escape(s.scope_id or "-")}</td>'
        f"<td>{escape(s.window)} {escape(s.window_label)}</td><td class=num>{escape(usd(s.limit))}</td>"
        f"<td class=num>{escape(usd(s.spent))}</td><td class=num>{escape(usd(s.held))}</td>"
        f"<td class=num>{escape(usd(s.remaining))}</td><td class=num>{_bar(s)}{escape(percent(s))}</td>"
        f"<td>{escape(_when(s.resets_at))}</td></tr>" for s in statuses)
    return f'<table id="counters"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def _flags(e: LedgerEntry) -> str:
    names = [n for n, on in (("refused", e.refused or e.kind == "refusal"), ("degraded", e.degraded),
                             ("clamped", e.clamped), ("estimated", e.estimated)) if on]
    return "".join(f'<span class="flag">{n}</span>' for n in names)


def _entries_table(entries: Sequence[LedgerEntry], table_id: str) -> str:
    head = ("<tr><th>at</th><th>kind</th><th>scopes</th><th>model</th><th class=num>tokens</th>"
            "<th class=num>cost</th><th class=num>reserved</th><th>flags</th><th>detail</th></tr>")
    rows = "".join(
        f"<tr><td>{escape(e.at.isoformat(timespec='seconds'))}</td><td>{escape(e.kind)}</td>"
        f"<td>{escape(', '.join(f'{k} {v}' for k, v in e.scopes.items()))}</td><td>{escape(e.model or '-')}</td>"
        f'<td class=num title="{escape(", ".join(f"{k} {v}" for k, v in e.tokens.items()))}">{e.total_tokens}</td>'
        f"<td class=num>{escape(usd(e.cost))}</td><td class=num>{escape(usd(e.reserved))}</td>"
        f"<td>{_flags(e)}</td><td>{escape(e.detail)}</td></tr>" for e in entries)
    return f'<table id="{table_id}"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def id_html(page: IdPage) -> str:
    out = [_statuses_table(page.statuses)]
    if not page.ledger:
        out.append(f'<p class="note" id="no-ledger">{escape(LEDGER_MISSING)}</p>')
        return "".join(out)
    own = [s for s in page.statuses if s.scope == page.scope]
    limit = own[0].limit if own else None
    out.append(f"<h2>Spend this {escape(own[0].window if own else 'window')}</h2>")
    out.append(spend_chart(page.curve, page.curve_since, datetime.now(timezone.utc), limit,
                           title=f"spend of {page.scope} {page.scope_id}"))
    out.append("<h2>Last calls</h2>")
    out.append(_entries_table(page.calls, "calls") if page.calls else '<p id="no-calls">No call in the ledger.</p>')
    return "".join(out)


def events_html(page: EventsPage) -> str:
    if not page.ledger:
        return f'<p class="note" id="no-ledger">Not available: {escape(LEDGER_MISSING)}</p>'
    if not page.events:
        return '<p id="no-events">No refusal, degrade or alert in the ledger.</p>'
    return _entries_table(page.events, "events")


def error_html(message: str) -> str:
    return f'<p class="error" id="error">{escape(message)}</p>'
