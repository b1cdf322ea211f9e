"""The finance review page under ``/review``: server-rendered HTML for people, no JavaScript.

Thin on purpose: reading and deciding are :mod:`domain.cases.review`, users and roles are
:mod:`app.services.auth`. This module owns the web-only parts and guarantees:

* Every route but the login form needs a logged-in user; anyone else gets a 302 to the
  login page with a ``next`` that can only be a local ``/review`` path (no open redirect).
* Every POST (login and logout included) carries the session's CSRF token, compared with
  :func:`hmac.compare_digest`; a missing or wrong token is a 400 page and nothing changes.
* Decisions (approve, refund, dismiss, reopen) need the ``approver`` role (a viewer gets a
  403 page); the actor in the audit log is the logged-in username.
* Pages are HTML, errors included (404, 400, 422, 429, 500), with ``Cache-Control:
  no-store``; the security headers (CSP, frame, referrer, HSTS over https) come from
  Flask-Talisman for the whole app (:mod:`app.web_security`).
* Sessions are server-side (:mod:`app.web_security`, wired by the factory): the cookie is
  a random id, logout deletes the session, "log out everywhere" deletes every session of
  the user, and a login always starts a new session (nothing planted before survives).
* Logins go through :class:`app.services.login_guard.LoginGuard`: too many failures for a
  username or from an address answer 429 with ``Retry-After`` without checking the
  password; failures, refusals and logins are audited.
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import current_user as login_current_user
from flask_login import login_user, logout_user
from werkzeug.exceptions import HTTPException

from app.errors import status_of
from app.extensions import services
from app.services.auth import ReviewUser, UserDirectory
from app.services.login_guard import LoginGuard, Locked
from app.services.web_sessions import SessionStore
from app.case_query import parse_filter
from domain.cases.report import report_csv, report_rows
from domain.cases.review import MAX_BULK, CaseActionError, approve, approve_many, dismiss, parse_case_ids, reopen
from domain.cases.views import SORT_KEYS, case_view, list_cases
from domain.cases.reasons import REASON_KINDS
from domain.errors import Kind
from domain.cases.refunds import PlannedRefund
from models import CASE_STATUSES
from models.money import MoneyError, check_amount, decimals, format_money

bp = Blueprint("review", __name__, url_prefix="/review")

# The queue shows this many cases a page unless the person picks the other size.
PAGE_SIZES = (50, 100)
DEFAULT_PAGE_SIZE = 100
# Query parameters the queue keeps from one page (or sort) to the next.
_FILTER_PARAMS = ("status", "currency", "from", "until", "reason", "amount_min", "amount_max")


@bp.record_once
def _root_redirect(state) -> None:  # type: ignore[no-untyped-def]
    """``/`` is the review queue's address people type: it redirects to ``/review``."""

    def root():  # type: ignore[no-untyped-def]
        return redirect(url_for("review.cases"), 302)

    state.app.add_url_rule("/", "root", root, methods=["GET"])

CSRF_FIELD = "csrf_token"
_MAJOR_AMOUNT = re.compile(r"^\d{1,15}(\.\d{1,6})?$")


def _directory() -> UserDirectory:
    return current_app.extensions["review_users"]


def _store() -> SessionStore:
    return current_app.extensions["review_sessions"]


def _guard_service() -> LoginGuard:
    return current_app.extensions["login_guard"]


# -- login, CSRF, roles --------------------------------------------------------------------


def csrf_token() -> str:
    """The session's CSRF token, made on first use; every form carries it."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def _csrf_ok() -> bool:
    expected = session.get("csrf")
    sent = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


def current_user() -> ReviewUser | None:
    """The logged-in user as configured now, or None (never logged in, session ended,
    user removed, password changed)."""
    user = login_current_user._get_current_object()  # type: ignore[attr-defined]
    return user if isinstance(user, ReviewUser) else None


def _safe_next(target: str | None) -> str:
    """``target`` when it is a local /review path, else the list page."""
    default = url_for("review.cases")
    if not target or len(target) > 2000 or "\\" in target or any(ord(c) < 32 for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/review") or target.startswith("//"):
        return default
    return target


@bp.before_request
def _guard():  # type: ignore[no-untyped-def]
    public = request.endpoint in ("review.login", "review.login_form")
    if not public and current_user() is None:
        target = request.full_path if request.method == "GET" else request.path
        return redirect(url_for("review.login_form", next=target.rstrip("?")), 302)
    if request.method == "POST" and not _csrf_ok():
        return _page("error.html", 400, title="Form expired", message="The form was missing its security token or it did not match. Reload the page and try again; nothing was changed.")
    return None


def _require_approver():  # type: ignore[no-untyped-def]
    user = current_user()
    if user is None or not user.can_decide:
        return _page("error.html", 403, title="Not allowed", message="Only approvers can take decisions on cases. Nothing was changed.")
    return None


@bp.after_request
def _no_store(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    response.vary.add("Cookie")
    return response


@bp.app_template_filter("money")
def _money(amount: int | None, currency: str) -> str:
    return "—" if amount is None else format_money(amount, currency)


@bp.app_template_filter("age")
def _age(seconds: int | None) -> str:
    """How long ago, in the largest whole unit: ``just now``, ``12 min``, ``5 h``, ``3 d``."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


@bp.app_template_global("csrf_token")
def _csrf_token_global() -> str:
    return csrf_token()


def _page(template: str, status: int = 200, **context: Any):  # type: ignore[no-untyped-def]
    return render_template(f"review/{template}", user=current_user(), statuses=CASE_STATUSES, **context), status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
    status = exc.code or 500
    return _page("error.html", status, title=exc.name, message=exc.description or exc.name)


@bp.errorhandler(Exception)
def _unexpected(exc: Exception):  # type: ignore[no-untyped-def]
    import logging

    logging.getLogger(__name__).exception("review page error")
    return _page("error.html", 500, title="Something went wrong", message="Something went wrong on our side. Nothing you did caused it; try again in a moment.")


@bp.get("/login")
def login_form():  # type: ignore[no-untyped-def]
    if current_user() is not None:
        return redirect(_safe_next(request.args.get("next")), 302)
    return _page("login.html", next=_safe_next(request.args.get("next")), configured=bool(_directory()))


@bp.post("/login")
def login():  # type: ignore[no-untyped-def]
    username = request.form.get("username")
    target = _safe_next(request.form.get("next"))

    def again(status: int, error: str):  # type: ignore[no-untyped-def]
        return _page("login.html", status, error=error, next=target, username=(username or "")[:255], configured=bool(_directory()))

    attempt = _guard_service().begin(username, request.remote_addr)
    if isinstance(attempt, Locked):
        body, status = again(429, f"Too many failed logins. Try again in {_duration(attempt.retry_after)}.")
        response = current_app.make_response((body, status))
        response.headers["Retry-After"] = str(attempt.retry_after)
        return response
    user = _directory().authenticate(username, request.form.get("password"))
    if user is None:
        _guard_service().failed(attempt)
        return again(401, "Invalid username or password")
    _guard_service().succeeded(attempt)
    # A new session on login: nothing from before (a planted token or id) survives.
    session.clear()
    session.rotate()  # type: ignore[attr-defined]
    login_user(user)
    session["csrf"] = secrets.token_urlsafe(32)
    return redirect(target, 303)


@bp.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    """End this session: its row is deleted, the old cookie opens nothing any more."""
    _end_session()
    flash("You are logged out.")
    return redirect(url_for("review.login_form"), 303)


@bp.post("/logout-everywhere")
def logout_everywhere():  # type: ignore[no-untyped-def]
    """End every session of the logged-in user, on every browser and device."""
    user = current_user()
    assert user is not None  # _guard let the request through
    ended = _store().delete_user(user.username)
    _end_session()
    flash(f"You are logged out everywhere ({ended} session(s) ended).")
    return redirect(url_for("review.login_form"), 303)


def _end_session() -> None:
    logout_user()
    session.clear()
    session.rotate()  # type: ignore[attr-defined]


def _duration(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{-(-seconds // 60)} minutes"


# -- reading -------------------------------------------------------------------------------


@bp.get("/", endpoint="cases_slash")
@bp.get("")
def cases():  # type: ignore[no-untyped-def]
    """The queue: one row per case, sortable by column, filterable, 50 or 100 a page, with
    the totals of everything the filter matches on top."""
    try:
        case_filter = parse_filter(request.args, default_per_page=DEFAULT_PAGE_SIZE)
    except CaseActionError as exc:
        return _page("error.html", status_of(exc), title="Check the filters", message=exc.message, back=url_for("review.cases"))
    with services().read_session_factory() as db:
        listing = list_cases(db, case_filter, rows=True)
    pages = max(1, -(-listing["total"] // listing["per_page"]))
    filters = {k: (request.args.get(k) or "").strip() for k in _FILTER_PARAMS}
    kept = {k: v for k, v in filters.items() if v}
    if case_filter.per_page != DEFAULT_PAGE_SIZE:
        kept["per_page"] = str(case_filter.per_page)
    sorting = {"sort": case_filter.sort, "dir": "desc" if case_filter.descending else "asc"} if case_filter.sort else {}

    def page_url(number: int) -> str:
        return url_for("review.cases") + "?" + urlencode({**kept, **sorting, "page": number})

    def sort_url(column: str) -> str:
        # A column's first click sorts ascending, the next one descending; always page 1.
        again = case_filter.sort == column and not case_filter.descending
        return url_for("review.cases") + "?" + urlencode({**kept, "sort": column, "dir": "desc" if again else "asc"})

    def aria_sort(column: str) -> str | None:
        if case_filter.sort != column:
            return None
        return "descending" if case_filter.descending else "ascending"

    today = datetime.now(timezone.utc).date()
    return _page(
        "list.html",
        listing=listing,
        filters=filters,
        per_page=case_filter.per_page,
        page_sizes=PAGE_SIZES,
        reason_kinds=REASON_KINDS,
        sort_keys=SORT_KEYS,
        pages=pages,
        page_url=page_url,
        sort_url=sort_url,
        aria_sort=aria_sort,
        here=request.full_path.rstrip("?"),
        max_bulk=MAX_BULK,
        report_since=filters["from"] or (today - timedelta(days=30)).isoformat(),
        report_until=filters["until"] or today.isoformat(),
    )


@bp.get("/cases/<int:case_id>")
def case_page(case_id: int):  # type: ignore[no-untyped-def]
    return _render_case(case_id)


def _render_case(case_id: int, status: int = 200, *, error: str | None = None, form: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    with services().read_session_factory() as db:
        view = case_view(db, case_id)
    if view is None:
        return _page("error.html", 404, title="No such case", message=f"There is no case {case_id}.", back=url_for("review.cases"))
    return _page("case.html", status, case=view, error=error, form=form or {})


@bp.route("/<path:anything>", methods=["GET", "POST"])
def not_found(anything: str):  # type: ignore[no-untyped-def]
    return _page("error.html", 404, title="Not found", message="There is no such page.", back=url_for("review.cases"))


@bp.get("/report.csv")
def report():  # type: ignore[no-untyped-def]
    try:
        since = _day(request.args.get("since"), "since", required=True)
        until = _day(request.args.get("until"), "until", required=False)
    except CaseActionError as exc:
        return _page("error.html", 400, title="Check the report dates", message=exc.message, back=url_for("review.cases"))
    assert since is not None
    # "until" is inclusive on the page, as in the list filters: the whole day.
    until_exclusive = until + timedelta(days=1) if until is not None else None
    with services().read_session_factory() as db:
        text = report_csv(report_rows(db, since=since, until=until_exclusive))
    name = f"duplicate-cases-{since.date().isoformat()}" + (f"-to-{until.date().isoformat()}" if until else "") + ".csv"
    return Response(
        text,
        mimetype="text/csv",
        headers={"Content-Type": "text/csv; charset=utf-8", "Content-Disposition": f'attachment; filename="{name}"'},
    )


def _day(raw: str | None, name: str, *, required: bool) -> datetime | None:
    text = (raw or "").strip()
    if not text:
        if required:
            raise CaseActionError("invalid_date", f"{name} is required: a date YYYY-MM-DD")
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc)
    except ValueError:
        raise CaseActionError("invalid_date", f"{name} must be a date YYYY-MM-DD") from None


# -- deciding ------------------------------------------------------------------------------


def _actor() -> str:
    user = current_user()
    assert user is not None  # _guard let the request through
    return user.username


def _done(case_id: int, message: str):  # type: ignore[no-untyped-def]
    flash(message)
    return redirect(url_for("review.case_page", case_id=case_id), 303)


def _failed(case_id: int, exc: CaseActionError, form: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return _render_case(case_id, status_of(exc), error=exc.message, form=form)


@bp.post("/cases/<int:case_id>/approve")
def approve_case(case_id: int):  # type: ignore[no-untyped-def]
    """Refund what the case proposes, through the same phased path as the job."""
    refused = _require_approver()
    if refused:
        return refused
    try:
        result = approve(services().refunds, case_id, actor=_actor(), note=request.form.get("note"))
    except CaseActionError as exc:
        return _failed(case_id, exc)
    return _done(case_id, _outcome_message("Approved", result))


@bp.post("/approve-selected")
def approve_selected():  # type: ignore[no-untyped-def]
    """"Approve selected" on the queue: each ticked case approved on its own, exactly as
    its own Approve button does (its phased refund, its audit entry), when it is an open
    case of clear duplicates proposing a full refund; any other case is refused with the
    reason and left as it was. The outcome per case is shown on the queue it came from."""
    refused = _require_approver()
    if refused:
        return refused
    back = _safe_next(request.form.get("back"))
    try:
        ids = parse_case_ids(request.form.getlist("case_id"))
        results = approve_many(
            services().refunds, services().session_factory, ids, actor=_actor(), note=request.form.get("note")
        )
    except CaseActionError as exc:
        flash(f"Nothing was approved: {exc.message}", "error")
        return redirect(back, 303)
    done = sum(1 for r in results if r.result == "refunded")
    approved = sum(1 for r in results if r.result == "approved")
    not_done = len(results) - done - approved
    summary = f"Approve selected: {done} approved and refunded"
    if approved:
        summary += f", {approved} approved with refunds not all done"
    summary += f", {not_done} refused or not started." if not_done else "."
    flash(summary, "bulk")
    for r in results:
        order = f" (order {r.order_id})" if r.order_id else ""
        flash(f"Case {r.case_id}{order}: {r.message}.", f"bulk-{r.result}")
    return redirect(back, 303)


@bp.post("/cases/<int:case_id>/refund")
def refund_case(case_id: int):  # type: ignore[no-untyped-def]
    """Refund the amounts typed per charge (major units, e.g. ``49.99``); blank = none."""
    refused = _require_approver()
    if refused:
        return refused
    form = {k: v for k, v in request.form.items() if k.startswith("amount-") or k == "note"}
    with services().read_session_factory() as db:
        view = case_view(db, case_id)
    if view is None:
        return _render_case(case_id)
    try:
        plan = parse_major_plan(view["charges"], request.form)
        result = approve(services().refunds, case_id, actor=_actor(), plan=plan, note=request.form.get("note"))
    except CaseActionError as exc:
        return _failed(case_id, exc, form)
    return _done(case_id, _outcome_message("Refund approved", result))


@bp.post("/cases/<int:case_id>/dismiss")
def dismiss_case(case_id: int):  # type: ignore[no-untyped-def]
    refused = _require_approver()
    if refused:
        return refused
    try:
        dismiss(services().session_factory, case_id, actor=_actor(), note=request.form.get("note"))
    except CaseActionError as exc:
        return _failed(case_id, exc, {"dismiss_note": request.form.get("note", "")})
    return _done(case_id, "Case dismissed. Nothing was refunded.")


@bp.post("/cases/<int:case_id>/reopen")
def reopen_case(case_id: int):  # type: ignore[no-untyped-def]
    refused = _require_approver()
    if refused:
        return refused
    try:
        reopen(services().session_factory, case_id, actor=_actor(), note=request.form.get("note"))
    except CaseActionError as exc:
        return _failed(case_id, exc)
    return _done(case_id, "Case reopened.")


def parse_major_plan(charges: list[dict[str, Any]], form: Any) -> list[PlannedRefund]:
    """The refund plan from per-charge fields ``amount-<charge id>`` typed in major units.

    Decimal arithmetic, never floats; more decimals than the currency has, negatives,
    zero and anything that is not a plain number are refused (422) before anything is
    asked of Stripe. Whether a charge may be refunded (keeper, dispute, more than it holds)
    is the service's decision.
    """
    plan: list[PlannedRefund] = []
    for charge in charges:
        raw = (form.get(f"amount-{charge['id']}") or "").strip().replace(" ", "")
        if not raw:
            continue
        currency = charge["currency"]
        label = f"The amount for charge {charge['id']}"
        if raw.startswith("-"):
            raise CaseActionError("invalid_amount", f"{label} cannot be negative.", kind=Kind.REFUSED)
        if not _MAJOR_AMOUNT.match(raw):
            raise CaseActionError("invalid_amount", f"{label} must be a number such as {_example(currency)}.", kind=Kind.REFUSED)
        places = decimals(currency)
        try:
            value = Decimal(raw)
        except InvalidOperation:  # pragma: no cover - the pattern already rules this out
            raise CaseActionError("invalid_amount", f"{label} must be a number.", kind=Kind.REFUSED) from None
        fraction = raw.partition(".")[2]
        if len(fraction) > places:
            raise CaseActionError(
                "invalid_amount",
                f"{label} has more decimals than {currency.upper()} allows ({places}).", kind=Kind.REFUSED,
            )
        minor = int(value.scaleb(places))
        if minor <= 0:
            raise CaseActionError("invalid_amount", f"{label} must be more than zero; leave it blank to refund nothing.", kind=Kind.REFUSED)
        try:
            check_amount(minor, currency)
        except MoneyError as exc:
            raise CaseActionError("invalid_amount", f"{label}: {exc}.", kind=Kind.REFUSED) from None
        plan.append(PlannedRefund(charge["id"], minor))
    if not plan:
        raise CaseActionError("invalid_refunds", "Enter an amount for at least one charge.", kind=Kind.REFUSED)
    return plan


def _example(currency: str) -> str:
    places = decimals(currency)
    return "49" if places == 0 else "49." + "9" * places


def _outcome_message(prefix: str, result: Any) -> str:
    done = [o for o in result.outcomes if o.result in ("refunded", "adopted")]
    other = [o for o in result.outcomes if o.result not in ("refunded", "adopted")]
    text = f"{prefix}: {len(done)} refund(s) issued; case is now {result.status}."
    if other:
        text += " Not done: " + "; ".join(f"{o.charge_id} {o.result}" + (f" ({o.message})" if o.message else "") for o in other)
    return text
