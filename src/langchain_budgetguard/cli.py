"""The ``budgetguard`` command: the demo, and operating a deployed budget.

Every command but ``demo``, ``prices`` and ``estimate`` reads the deployment's config file
(``--config FILE`` or ``$BUDGETGUARD_CONFIG``). Tables for people, ``--json`` for scripts.

Exit codes (scripts can rely on them):

    0  ok
    1  refused or over a limit (status: a limit shown has nothing left; prices/estimate: the
       guard cannot price the model; reset: not confirmed), or an invalid config file
    2  usage error: bad arguments, no config file, a scope or window the config does not have,
       reset without --yes and no terminal to ask on
    3  the budget store could not be reached
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from .limits import GLOBAL, WINDOWS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_STORE = 3

_CONFIG_ENV = "BUDGETGUARD_CONFIG"

_EPILOG = """\
examples:
  budgetguard demo                                   the demo: fake models, no Redis, no key
  budgetguard check-config config/saas.toml          validate a config (never touches the store)
  export BUDGETGUARD_CONFIG=config/saas.toml         (or pass --config FILE to each command)
  budgetguard status tenant --id acme                acme's limits: limit, spent, held, remaining, resets
  budgetguard status user --json                     every user with spend this window, for scripts
  budgetguard top tenant -n 5                        the five tenants that spent most this month
  budgetguard top user --window day --at 2026-11-22  ... on a past day
  budgetguard ledger user --id alice --since 1d      alice's calls of the last day, newest first
  budgetguard ledger --since 2026-11-01 --csv       every call since Nov 1 as CSV (exact USD), for the invoice
  budgetguard limit set tenant 1000 --id acme        acme gets $1000 a month, live (no restart)
  budgetguard limit set user 0 --id ci-bot           ci-bot gets nothing
  budgetguard limit set user 3 --window day          every user: $3 a day
  budgetguard limit get                              limits and overrides in force
  budgetguard limit clear tenant --id acme           back to the config file's limit
  budgetguard reset user --id alice --window day     zero alice's spend today (asks; --yes for scripts)
  budgetguard prices gpt-4o-mini                     what the guard charges per token
  budgetguard estimate --model gpt-4o prompt.txt     the reservation a prompt takes (or pipe it on stdin)
  budgetguard metrics --port 9464                    Prometheus metrics of the budget's counters
  budgetguard dashboard --port 8765                  a read-only web page of the budget (127.0.0.1)

exit codes:
  0  ok
  1  refused or over a limit (status: a limit shown has nothing left; prices/estimate: the model
     cannot be priced; reset: not confirmed), or an invalid config file
  2  usage error (bad arguments, no config file, unknown scope or window, reset without --yes
     and no terminal)
  3  the budget store could not be reached
"""


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit code 2)."""


class _Refused(Exception):
    """Exit code 1 with a message (not an error of the command line)."""


# -- output helpers ---------------------------------------------------------------------------


def _dec(value: Decimal | None) -> str | None:
    """A Decimal in plain positional notation (``0.00001125``, never ``1.125E-5``)."""
    if value is None:
        return None
    return format(value.normalize() if value else Decimal(0), "f")


def _usd(value: Decimal | None) -> str:
    return "-" if value is None else "$" + (_dec(value) or "0")


def _amount(value: Decimal | None, unit: str = "usd") -> str:
    """An amount in its limit's unit: ``$0.25``, ``5000 tokens``, ``10 requests``."""
    if unit == "usd" or value is None:
        return _usd(value)
    return f"{_dec(value) or '0'} {unit}"


def _percent(used: Decimal, limit: Decimal) -> str:
    return f"{(used / limit * 100):.1f}%" if limit else "100%"  # a $0 limit is all used


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: str = "") -> str:
    """A plain text table; columns whose index is in ``right`` are right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if str(i) in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _status_json(s: Any) -> dict[str, Any]:
    return {
        "scope": s.scope,
        "id": s.scope_id,
        "window": s.window,
        "window_label": s.window_label,
        "limit": _dec(s.limit),
        "spent": _dec(s.spent),
        "held": _dec(s.held),
        "sliced": _dec(s.sliced),
        "remaining": _dec(s.remaining),
        "used_percent": _dec((s.spent + s.held) / s.limit * 100) if s.limit else None,
        "resets_at": s.resets_at.isoformat() if s.resets_at else None,
        "key": s.key,
        "unit": s.unit,
    }


def _held(s: Any) -> str:
    """Held, and the part of it that processes' leased slices hold (the rest: calls in flight)."""
    if not s.sliced:
        return _amount(s.held, s.unit)
    return f"{_amount(s.held, s.unit)} ({_amount(s.sliced, s.unit)} in slices)"


def _status_rows(statuses: Sequence[Any]) -> str:
    rows = [[
        s.scope, "-" if s.scope_id is None else s.scope_id, f"{s.window} {s.window_label}", _amount(s.limit, s.unit),
        _amount(s.spent, s.unit), _held(s), _amount(s.remaining, s.unit),
        _percent(s.spent + s.held, s.limit),
        s.resets_at.isoformat() if s.resets_at else "never",
    ] for s in statuses]
    headers = ["scope", "id", "window", "limit", "spent", "held", "remaining", "used", "resets at"]
    return _table(headers, rows, right="34567")


# -- config and store -------------------------------------------------------------------------


def _config_path(args: argparse.Namespace, required: bool = True) -> str | None:
    path = getattr(args, "config", None) or os.environ.get(_CONFIG_ENV) or None
    if path is None and required:
        raise UsageError(f"no config file: pass --config FILE or set {_CONFIG_ENV}")
    return path


def _load(args: argparse.Namespace, required: bool = True) -> Any:
    from .config import load_config

    path = _config_path(args, required)
    if path is None:
        return None
    config = load_config(path)
    store = getattr(args, "store", None)
    if store:
        config = dataclasses.replace(config, store_url=store, store_url_env=None)
    return config


def _admin(config: Any) -> Any:
    from .overrides import BudgetAdmin

    return BudgetAdmin(config.policy())


def _shared_store(config: Any, command: str) -> None:
    """Refuse a change that would land in this command's own in-process store: it would report
    success and change nothing any guard reads."""
    if config.resolve_store_url() in ("memory", "memory://"):
        raise UsageError(
            f"{command}: {config.source} keeps its counters in memory (in-process: every process has its own), "
            "so a change made here reaches no running guard; point store.url (or --store) at the shared "
            "Redis, e.g. --store redis://host:6379/0")


def _scope_of(config: Any, scope: str | None, *, allow_global: bool = True) -> str:
    scopes = list(dict.fromkeys(x.per for x in config.limits))
    if scope is None:
        candidates = [s for s in scopes if allow_global or s != GLOBAL]
        if len(candidates) == 1:
            return candidates[0]
        raise UsageError(f"say which scope: {', '.join(candidates) or 'the config has none'}")
    if scope not in scopes:
        raise UsageError(f"{config.source} has no limit per {scope!r}; its scopes are: {', '.join(scopes)}")
    return scope


def _has_window(config: Any, scope: str | None, window: str | None) -> None:
    if window is not None and not any(x.window == window and scope in (None, x.per) for x in config.limits):
        raise UsageError(f"{config.source} has no limit per {scope or 'any scope'} per {window}")


def _checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an admin call; a limit or window the config lacks is a usage error."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- commands ---------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(sys.stdout)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    path = args.file or _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if getattr(args, "json", False):
            _print_json({"ok": False, "file": path,
                         "errors": [{"key": k, "message": m, "text": f"{path}: {k}: {m}" if k else f"{path}: {m}"}
                                    for k, m in exc.problems]})
        else:
            sys.stderr.write(f"{exc}\n")
            sys.stderr.write(f"{path}: invalid ({len(exc.problems)} problem{'s' if len(exc.problems) > 1 else ''})\n")
        return EXIT_REFUSED
    if getattr(args, "json", False):
        _print_json({"ok": True, "file": path, "config": config.to_dict()})
        return EXIT_OK
    out = [f"{path}: ok", f"  budget     {config.name}", f"  store      {config.describe_store()}"
           + (f" (prefix {config.prefix!r})" if config.prefix else ""),
           f"  on error   {config.on_store_error}"
           + (f", fail-open allowance {_usd(config.fail_open_allowance)} per process"
              if config.fail_open_allowance is not None else ""),
           f"  estimate   {config.estimator}, default output cap "
           f"{config.default_max_output_tokens or 4096} tokens",
           f"  overrides  live from the store every {config.override_refresh_seconds:g} s"
           if config.live_overrides else "  overrides  config only (store.live_overrides = false)"]
    if config.mode == "shadow":
        out.append("  mode       shadow (counts and alerts, never refuses or degrades)")
    for limit in config.limits:
        tz = "" if limit.tz == "UTC" else f" ({limit.tz})"
        who = "global" if limit.per == GLOBAL else f"per {limit.per}"
        amount = _usd(limit.usd) if limit.unit == "usd" else f"{limit.amount:,} {limit.unit}"
        alerts = ", ".join(f"{format((a * 100).normalize(), 'f')}%" for a in limit.alerts)
        out.append(f"  limit      {amount} {who} per {limit.window}{tz}"
                   + (f", alerts at {alerts}" if alerts else ""))
    webhook = config.describe_webhook()
    decisions = ("no refusal or degrade alerts" if config.decision_alert_seconds is None
                 else f"refusals and degrades at most every {config.decision_alert_seconds:g} s per id")
    out.append(f"  alerts     webhook {webhook}, {decisions}" if webhook else f"  alerts     no webhook, {decisions}")
    for o in config.overrides:
        out.append(f"  override   {o.per} {o.id}: {_usd(o.usd)} per {o.window}")
    for model in config.prices:
        out.append(f"  price      {model}")
    for model, ladder in config.degrade.items():
        out.append(f"  degrade    {model} -> {' -> '.join(ladder)}")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.id is not None and args.scope is None:
        raise UsageError("--id needs a scope: budgetguard status user --id alice")
    if args.scope is not None:
        _scope_of(config, args.scope)
    _has_window(config, args.scope, args.window)
    admin = _admin(config)
    statuses = _checked(admin.statuses, args.scope, args.id, args.window, args.at, args.tenant)
    exhausted = any(s.remaining <= 0 for s in statuses)
    if getattr(args, "json", False):
        _print_json({"budget": config.name, "store": config.describe_store(),
                     "statuses": [_status_json(s) for s in statuses], "exhausted": exhausted})
    elif statuses:
        sys.stdout.write(f"budget {config.name} ({config.describe_store()})\n{_status_rows(statuses)}\n")
    else:
        sys.stdout.write(f"budget {config.name}: no counters for that in this window\n")
    return EXIT_REFUSED if exhausted else EXIT_OK


_SINCE_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _since(text: str | None) -> Any:
    """``--since``: an ISO date or time (UTC unless it says), or an age: ``30m``, ``12h``, ``7d``, ``2w``."""
    from datetime import datetime, timedelta, timezone

    if text is None:
        return None
    unit = _SINCE_UNITS.get(text[-1:])
    if unit is not None and text[:-1].isdigit():
        return datetime.now(timezone.utc) - timedelta(seconds=int(text[:-1]) * unit)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since: expected an ISO date/time (2026-11-01, 2026-11-01T09:00+01:00) or an age "
                         f"(30m, 12h, 7d, 2w), got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _ledger_json(r: Any) -> dict[str, Any]:
    return {"at": r.at.isoformat() if r.at else None, "budget": r.budget, "kind": r.kind, "call_id": r.call_id,
            "scopes": dict(r.scopes), "keys": list(r.keys), "model": r.model, "host": r.host, "tokens": dict(r.tokens),
            "cost": _dec(r.cost), "reserved": _dec(r.reserved) if r.reserved is not None else None,
            "estimated": r.estimated, "degraded": r.degraded, "clamped": r.clamped, "refused": r.refused,
            "detail": r.detail}


def _cmd_ledger(args: argparse.Namespace) -> int:
    from .stores.ledger import LEDGER_KINDS, rows_to_csv

    config = _load(args)
    if args.scope is not None:
        _scope_of(config, args.scope)
    if args.count < 1:
        raise UsageError("-n/--count: expected 1 or more")
    if args.kind is not None and args.kind not in LEDGER_KINDS:
        raise UsageError(f"--kind: expected one of {', '.join(LEDGER_KINDS)}")
    if args.csv and getattr(args, "json", False):
        raise UsageError("--json or --csv, not both")
    admin = _admin(config)
    reader = getattr(admin, "read_ledger", None)
    if reader is None:
        raise UsageError(f"the store ({config.describe_store()}) keeps no ledger")
    rows = _checked(reader, scope=args.scope, scope_id=args.id, since=_since(args.since),
                    kinds=None if args.kind is None else (args.kind,), model=args.model, limit=args.count)
    if args.csv:
        sys.stdout.write(rows_to_csv(rows))
    elif getattr(args, "json", False):
        _print_json({"budget": config.name, "rows": [_ledger_json(r) for r in rows]})
    elif rows:
        flags = lambda r: "".join(c for c, on in zip("EDCR", (r.estimated, r.degraded, r.clamped, r.refused)) if on)  # noqa: E731
        sys.stdout.write(_table(
            ["at", "kind", "call", "model", "charged to", "in", "out", "cost", "reserved", "flags"],
            [[r.at.isoformat(timespec="milliseconds") if r.at else "-", r.kind, r.call_id, r.model or "-",
              " ".join(f"{k}={v}" for k, v in sorted(r.scopes.items())), str(r.tokens.get("input", 0)),
              str(r.tokens.get("output", 0)), _usd(r.cost), _usd(r.reserved) if r.reserved is not None else "-",
              flags(r)] for r in rows],
            right="5678") + "\n(flags: E estimated, D degraded, C clamped, R refused)\n")
    else:
        sys.stdout.write(f"budget {config.name}: no ledger rows for that\n")
    return EXIT_OK


def _cmd_top(args: argparse.Namespace) -> int:
    config = _load(args)
    scope = _scope_of(config, args.scope, allow_global=False)
    if args.count < 1:
        raise UsageError("-n/--count: expected 1 or more")
    admin = _admin(config)
    rows = _checked(admin.top, scope, args.window, args.at, args.count)
    if getattr(args, "json", False):
        _print_json({"budget": config.name, "scope": scope, "top": [_status_json(s) for s in rows]})
    elif rows:
        sys.stdout.write(f"budget {config.name}: heaviest {scope}s, {rows[0].window} {rows[0].window_label}\n")
        sys.stdout.write(_table(
            ["#", scope, "spent", "held", "limit", "remaining", "used"],
            [[str(i), s.scope_id or "-", _amount(s.spent, s.unit), _amount(s.held, s.unit), _amount(s.limit, s.unit),
              _amount(s.remaining, s.unit), _percent(s.spent + s.held, s.limit)] for i, s in enumerate(rows, 1)],
            right="0234567") + "\n")
    else:
        sys.stdout.write(f"budget {config.name}: no {scope} has spent anything in that window\n")
    return EXIT_OK


def _limit_json(row: Any) -> dict[str, Any]:
    return {"scope": row.per, "id": row.scope_id, "window": row.window, "tz": row.tz,
            "configured": _dec(row.configured), "config_override": _dec(row.config_override),
            "store_override": _dec(row.store_override), "effective": _dec(row.effective), "source": row.source,
            "field": row.field, "unit": row.unit}


def _limit_table(rows: Sequence[Any]) -> str:
    return _table(
        ["scope", "id", "window", "configured", "config override", "store override", "in force", "from"],
        [[r.per, "-" if r.per == GLOBAL else (r.scope_id or "* (every id)"), r.window, _amount(r.configured, r.unit),
          _amount(r.config_override, r.unit), _amount(r.store_override, r.unit), _amount(r.effective, r.unit),
          r.source] for r in rows],
        right="3456")


def _cmd_limit(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.action is None:
        raise UsageError("limit: say get, set or clear (budgetguard limit --help)")
    if args.action == "get":
        if args.scope is not None:
            _scope_of(config, args.scope)
        elif args.id is not None:
            raise UsageError("--id needs a scope: budgetguard limit get user --id alice")
        rows = _checked(_admin(config).limit_rows, args.scope, args.id, args.window)
        if getattr(args, "json", False):
            _print_json({"budget": config.name, "limits": [_limit_json(r) for r in rows]})
        else:
            sys.stdout.write(f"budget {config.name}\n{_limit_table(rows)}\n")
        return EXIT_OK
    scope = _scope_of(config, args.scope)
    _shared_store(config, f"limit {args.action}")
    admin = _admin(config)
    if args.action == "set":
        from .money import to_decimal

        try:
            usd = to_decimal(args.usd, what="USD")
        except (TypeError, ValueError) as exc:
            raise UsageError(f"limit set: {exc}") from None
        row = _checked(admin.set_limit, scope, usd, args.id, args.window, args.tz)
    else:
        row = _checked(admin.clear_limit, scope, args.id, args.window, args.tz)
    if getattr(args, "json", False):
        _print_json({"budget": config.name, "limit": _limit_json(row),
                     "refresh_seconds": config.override_refresh_seconds if config.live_overrides else None})
    else:
        who = "global" if row.per == GLOBAL else f"{row.per} {row.scope_id}" if row.scope_id else f"every {row.per}"
        sys.stdout.write(f"{who}, per {row.window}: {_usd(row.effective)} ({row.source})\n")
        if config.live_overrides:
            sys.stdout.write(f"every process of budget {config.name} enforces it within "
                             f"{config.override_refresh_seconds:g} s\n")
        else:
            sys.stdout.write(f"note: {config.source} sets store.live_overrides = false: guards built from it "
                             "ignore overrides in the store\n")
    return EXIT_OK


def _cmd_reset(args: argparse.Namespace) -> int:
    config = _load(args)
    scope = _scope_of(config, args.scope)
    if scope != GLOBAL and args.id is None:
        raise UsageError(f"reset: say whose counter: budgetguard reset {scope} --id ID")
    _has_window(config, scope, args.window)
    _shared_store(config, "reset")
    admin = _admin(config)
    targets = _checked(admin.statuses, scope, args.id, args.window, args.at, args.tenant)
    if not targets:
        sys.stderr.write(f"reset: {scope} {args.id} has no counter in that window; nothing to reset\n")
        return EXIT_OK
    sys.stderr.write("about to zero the spent of:\n" + _status_rows(targets) + "\n")
    if not args.yes:
        if not sys.stdin or not sys.stdin.isatty():
            sys.stderr.write("reset: not confirmed; no terminal to ask on: pass --yes to reset without asking\n")
            return EXIT_USAGE
        sys.stderr.write("zero these counters? [y/N] ")
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            sys.stderr.write("reset: not confirmed; nothing changed\n")
            return EXIT_REFUSED
    done = _checked(admin.reset, scope, args.id, args.window, args.at, None, args.tenant)
    if getattr(args, "json", False):
        _print_json({"budget": config.name, "reset": [
            {"key": r.key, "id": r.scope_id, "window_label": r.window_label, "spent_before": _dec(r.spent_before),
             "held": _dec(r.held)} for r in done]})
    else:
        for r in done:
            sys.stdout.write(f"reset {r.key}: spent was {_usd(r.spent_before)}, now $0 "
                             f"(held by calls in flight: {_usd(r.held)})\n")
    return EXIT_OK


_PRICE_ROWS = (
    ("input", "input"),
    ("output", "output"),
    ("cache read", "cache_read"),
    ("cache write", "cache_write"),
    ("cache write 1h", "cache_write_1h"),
    ("reasoning", "reasoning"),
)
_MTOK = Decimal(1_000_000)


def _pricer(config: Any) -> Any:
    from .pricing import Pricer, default_pricer

    if config is not None and (config.prices or config.fallback_price is not None):
        return Pricer(dict(config.prices), config.fallback_price)
    return default_pricer()


def _card(config: Any, model: str, provider: str | None) -> Any:
    from .errors import UnknownModelPriceError
    from .pricing import ModelRef

    try:
        return _pricer(config).rate_card(ModelRef(model, provider))
    except UnknownModelPriceError as exc:
        raise _Refused(str(exc)) from None


def _cmd_prices(args: argparse.Namespace) -> int:
    config = _load(args, required=False)
    card = _card(config, args.model, args.provider)
    shown = [(label, key) for label, key in _PRICE_ROWS
             if key in card.prices and not (key == "cache_write_1h" and card.prices[key] == card.prices["cache_write"])]
    where = getattr(config, "source", "")
    source = {"genai-prices": "genai-prices list price", "override": f"price override in {where}",
              "fallback": f"fallback_price in {where}"}.get(card.source, card.source)
    if getattr(args, "json", False):
        _print_json({
            "model": card.model, "provider": card.provider, "source": card.source, "priced_as": card.priced_as,
            "tiers_above_input_tokens": list(card.tiers),
            "valid_until": card.valid_until.isoformat() if card.valid_until else None,
            "usd_per_million_tokens": {key: _dec(card.prices[key]) for _, key in shown},
            "usd_per_token": {key: _dec(card.prices[key] / _MTOK) for _, key in shown},
            "usd_per_request": _dec(card.prices.get("request")),
        })
        return EXIT_OK
    head = f"{card.model}" + (f" ({card.provider})" if card.provider else "") + f": {source}"
    if card.priced_as:
        head += f", priced as {card.priced_as}"
    lines = [head, _table(["tokens", "USD per 1M", "USD per token"],
                          [[label, _dec(card.prices[key]) or "0", _dec(card.prices[key] / _MTOK) or "0"]
                           for label, key in shown], right="12")]
    if "request" in card.prices:
        lines.append(f"plus {_usd(card.prices['request'])} per request")
    if card.tiers:
        lines.append("dearer rates apply to prompts above " + ", ".join(f"{t:,}" for t in card.tiers)
                     + " input tokens (rates shown: the first tier)")
    if card.valid_until:
        lines.append(f"this price changes at {card.valid_until.isoformat()}")
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _read_prompt(source: str | None) -> list[Any]:
    from langchain_core.messages import HumanMessage, convert_to_messages

    if source in (None, "-"):
        if source is None and (sys.stdin is None or sys.stdin.isatty()):
            raise UsageError("estimate: give a prompt file, or pipe the prompt on stdin")
        text = sys.stdin.read()
    else:
        try:
            text = Path(source).read_text("utf-8")
        except OSError as exc:
            raise UsageError(f"estimate: cannot read {source}: {exc.strerror or exc}") from None
        if source.endswith(".json"):
            try:
                return convert_to_messages(json.loads(text))
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise UsageError(f"estimate: {source} is not a JSON list of messages "
                                 f'([{{"role": "user", "content": "..."}}]): {exc}') from None
    return [HumanMessage(text)]


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import (
        DEFAULT_MAX_OUTPUT_TOKENS,
        bounded_input_tokens,
        estimate_input_tokens,
        get_estimator,
        unsized_references,
    )
    from .money import nano_to_usd

    config = _load(args, required=False)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens: expected 1 or more")
    messages = _read_prompt(args.prompt)
    card = _card(config, args.model, args.provider)
    cap = args.max_tokens or (config.default_max_output_tokens if config else None) or DEFAULT_MAX_OUTPUT_TOKENS
    result: dict[str, dict[str, Any]] = {}
    for mode in ("strict", "typical"):
        estimator = get_estimator(mode)
        tokens = estimate_input_tokens(estimator, messages, [], args.model)
        # As the guard reserves (guard._estimate): input (a document by URL or file id at the model's
        # whole input limit) + the output cap; in strict mode a prompt that may be written to a
        # provider's cache is held at the dearer cache-write rate, and the output at the dearest kind
        # the model bills (audio, images).
        tokens = bounded_input_tokens(tokens, unsized_references(estimator, messages), card.context_window)
        strict = mode == "strict"
        reserve, input_cost = card.hold_nano(tokens, cap, dearer_cache_write=strict, dearest_output=strict)
        result[mode] = {"input_tokens": tokens, "reservation_usd": nano_to_usd(reserve),
                        "input_usd": nano_to_usd(input_cost)}
    used = config.estimator if config is not None else "strict"
    if getattr(args, "json", False):
        _print_json({"model": card.model, "provider": card.provider, "output_tokens": cap, "guard_mode": used,
                     **{mode: {"input_tokens": r["input_tokens"], "reservation_usd": _dec(r["reservation_usd"]),
                               "input_usd": _dec(r["input_usd"])} for mode, r in result.items()}})
        return EXIT_OK
    sys.stdout.write(f"{card.model}: {len(messages)} message(s), output reserved at {cap:,} tokens"
                     f"{' (--max-tokens)' if args.max_tokens else ' (the default cap)'}\n")
    sys.stdout.write(_table(
        ["estimate", "input tokens", "input USD", "reservation USD", ""],
        [[mode, f"{r['input_tokens']:,}", _usd(r["input_usd"]), _usd(r["reservation_usd"]),
          "<- the guard's mode" if mode == used else ""] for mode, r in result.items()],
        right="123") + "\n")
    return EXIT_OK


def _cmd_metrics(args: argparse.Namespace) -> int:
    config = _load(args)
    try:
        from prometheus_client import CollectorRegistry

        from .metrics import BudgetMetrics
    except ImportError:
        raise UsageError("metrics need prometheus-client: pip install 'langchain-budgetguard[metrics]'") from None
    metrics = BudgetMetrics(registry=CollectorRegistry(), id_labels=args.id_label or (), min_interval=args.interval)
    metrics.watch(config.policy())
    if args.once:
        sys.stdout.write(metrics.exposition())
        up = metrics.registry.get_sample_value("budgetguard_store_up", {"budget": config.name})
        return EXIT_OK if up else EXIT_STORE
    if args.port is None:
        raise UsageError("metrics: give --port PORT to serve, or --once to print them")
    metrics.serve(args.port, args.addr)
    sys.stderr.write(f"serving metrics of budget {config.name} on http://{args.addr}:{args.port}/metrics "
                     "(Ctrl-C stops)\n")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return EXIT_OK


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import DashboardData, InsecureBindError, check_bind, make_server
    from .dashboard.server import TOKEN_ENV

    config = _load(args)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        check_bind(args.host, token)
    except InsecureBindError as exc:
        raise UsageError(str(exc)) from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port: expected 0..65535, got {args.port}")
    data = DashboardData(_admin(config), source=str(config.source), store=config.describe_store())
    try:
        server = make_server(data, args.host, args.port, token)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    sys.stderr.write(f"dashboard of budget {config.name} on {server.url}/"
                     + (" (bearer token required; a browser can open /?token=TOKEN once)" if token else "")
                     + " (read-only; Ctrl-C stops)\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"the deployment's config file (default: ${_CONFIG_ENV})")
    common.add_argument("--store", metavar="URL", default=argparse.SUPPRESS,
                        help="use this store URL instead of the config's (e.g. through a tunnel)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of tables")
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="budgetguard",
        description="Hard spending limits for LangChain chat models.",
        epilog="example: budgetguard demo\n\n" + _EPILOG,
        formatter_class=formatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        description = description or help.replace("%%", "%")  # help is %-formatted, description is not
        return commands.add_parser(name, help=help, description=description, parents=[common],
                                   formatter_class=formatter, epilog=_EPILOG)

    commands.add_parser("demo", help="run a small chain on fake models and the in-process store (no Redis, no key)")
    p = command("check-config", "validate a config file without touching the store")
    p.add_argument("file", nargs="?", help=f"the config file (default: --config or ${_CONFIG_ENV})")

    p = command("status", "limit, spent, held, remaining, %% used and reset time, for one id or every id of a scope")
    p.add_argument("scope", nargs="?", help="user, project, tenant, global... (default: every limit)")
    p.add_argument("--id", help="whose counters (default: every id with spend in the window)")
    p.add_argument("--window", choices=WINDOWS, help="only the limit per this window")
    p.add_argument("--at", metavar="LABEL", help="a past window: 2026-11, 2026-11-22, 2026-W47, 2026-11-22T09")
    p.add_argument("--tenant", help="the tenant of --id, when the budget has per-tenant limits (else: found by scan)")

    p = command("top", "the heaviest spenders of a scope in a window (current by default)")
    p.add_argument("scope", nargs="?", help="user, project, tenant... (default: the config's only per-id scope)")
    p.add_argument("--window", choices=WINDOWS, help="when the scope has limits per several windows")
    p.add_argument("--at", metavar="LABEL", help="a past window: 2026-11, 2026-11-22, 2026-W47, 2026-11-22T09")
    p.add_argument("-n", "--count", type=int, default=10, help="how many (default 10)")

    p = command("ledger", "settled calls, newest first: when, who, model, tokens, exact cost (--csv for finance)")
    p.add_argument("scope", nargs="?", help="only calls charged to this scope (user, tenant, ...)")
    p.add_argument("--id", help="only calls charged to this id (of SCOPE, or of any scope)")
    p.add_argument("--since", metavar="T", help="only rows at or after T: 2026-11-01, 2026-11-01T09:00Z, 12h, 7d")
    p.add_argument("--model", help="only calls served by this model")
    p.add_argument("--kind", help="call, refusal or degrade (a degraded call counts as degrade too)")
    p.add_argument("-n", "--count", type=int, default=100, help="at most this many rows (default 100)")
    p.add_argument("--csv", action="store_true", help="CSV with a header row, exact decimal USD")

    p = command("limit", "get, set or clear live limit overrides (in force everywhere without a restart)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    get = actions.add_parser("get", help="the limits and overrides in force", parents=[common])
    get.add_argument("scope", nargs="?")
    set_ = actions.add_parser("set", help="override a limit for one id (--id) or every id of the scope",
                              parents=[common])
    set_.add_argument("scope")
    set_.add_argument("usd", help="the new limit in USD per window (0 refuses every call)")
    clear = actions.add_parser("clear", help="drop a live override (the config applies again)", parents=[common])
    clear.add_argument("scope")
    for sub in (get, set_, clear):
        sub.add_argument("--id", help="one id's limit (default: the limit of every id of the scope)")
        sub.add_argument("--window", choices=WINDOWS, help="when the scope has limits per several windows")
    for sub in (set_, clear):
        sub.add_argument("--tz", help="when the scope has limits per one window in several time zones")

    p = command("reset", "zero a counter's spent (asks for confirmation unless --yes)")
    p.add_argument("scope")
    p.add_argument("--id", help="whose counter (required but for global limits)")
    p.add_argument("--window", choices=WINDOWS, help="only the limit per this window (default: each of the scope)")
    p.add_argument("--at", metavar="LABEL", help="a past window (default: the current one)")
    p.add_argument("--tenant", help="the tenant of --id, when the budget has per-tenant limits")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (for scripts)")

    p = command("prices", "what the guard charges per token for a model (USD per 1M and per token)")
    p.add_argument("model")
    p.add_argument("--provider", help="openai, anthropic, google, aws, azure... when the name is ambiguous")

    p = command("estimate", "the reservation a prompt would take on a model (strict and typical)")
    p.add_argument("prompt", nargs="?", help="a text file, a .json list of messages, or - for stdin (default: stdin)")
    p.add_argument("--model", required=True)
    p.add_argument("--provider")
    p.add_argument("--max-tokens", type=int, help="the call's output cap (default: the config's or 4096)")

    p = command("metrics", "Prometheus metrics of the budget's counters (serve with --port, or print --once)")
    p.add_argument("--port", type=int)
    p.add_argument("--addr", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for a Prometheus on another host)")
    p.add_argument("--once", action="store_true", help="print the metrics once and exit")
    p.add_argument("--id-label", action="append", metavar="SCOPE",
                   help="also export per-id series for this scope (mind label cardinality)")
    p.add_argument("--interval", type=float, default=10.0, help="reuse store readings this long (default 10 s)")

    p = command("dashboard", "a read-only web page of the budget: limits, ids by %% used, one id, refusals")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0: a free one)")
    p.add_argument("--token", help="require Authorization: Bearer TOKEN (default: $BUDGETGUARD_DASHBOARD_TOKEN)")
    return parser


_COMMANDS = {
    "demo": _cmd_demo,
    "check-config": _cmd_check_config,
    "status": _cmd_status,
    "top": _cmd_top,
    "ledger": _cmd_ledger,
    "limit": _cmd_limit,
    "reset": _cmd_reset,
    "prices": _cmd_prices,
    "estimate": _cmd_estimate,
    "metrics": _cmd_metrics,
    "dashboard": _cmd_dashboard,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .errors import BudgetStoreUnavailableError

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error (2, message already printed)
        return int(exit.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    as_json = getattr(args, "json", False)

    def fail(code: int, message: str) -> int:
        if as_json:
            _print_json({"error": message, "exit_code": code})
        sys.stderr.write(f"budgetguard {args.command}: {message}\n")
        return code

    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except ConfigError as exc:
        return fail(EXIT_REFUSED, str(exc))
    except _Refused as exc:
        return fail(EXIT_REFUSED, str(exc))
    except BudgetStoreUnavailableError as exc:
        return fail(EXIT_STORE, str(exc))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
