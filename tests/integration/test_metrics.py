"""/metrics exposes the series operations need, after real ingest, in one process and
added up across gunicorn workers."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import stripe_payloads as p
from tests.conftest import API_TOKEN, WEBHOOK_SECRET
from tests.servers import reconciler_serve, wait_for_workers


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# /metrics needs a metrics-scoped or the full legacy token (tests/integration/test_api_scopes.py).
METRICS_AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def test_metrics_after_ingest(client, deliver, api_headers) -> None:  # type: ignore[no-untyped-def]
    before = scrape(client.get("/metrics", headers=METRICS_AUTH).get_data(as_text=True))
    charge = p.charge(metadata={"order_id": "ord_metrics"})
    event = p.event("charge.succeeded", charge)
    assert deliver(event).get_json()["status"] == "received"
    assert deliver(event).get_json()["status"] == "duplicate"
    assert deliver(p.event("customer.created", {"id": "cus_1", "object": "customer"})).get_json()["status"] == "ignored"
    assert client.post("/webhooks/stripe", data=b"{}", headers={"Stripe-Signature": "t=1,v1=00"}).status_code == 400
    client.post("/orders/ord_metrics/pay", headers=api_headers)  # already paid: 409

    response = client.get("/metrics", headers=METRICS_AUTH)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    after = scrape(response.get_data(as_text=True))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("reconciler_webhook_events_total", type="charge.succeeded", outcome="received") == 1
    assert delta("reconciler_webhook_events_total", type="charge.succeeded", outcome="duplicate") == 1
    assert delta("reconciler_webhook_events_total", type="customer.created", outcome="ignored") == 1
    assert delta("reconciler_webhook_events_total", type="unknown", outcome="rejected") == 1
    assert delta("reconciler_webhook_ingest_seconds_count") == 3
    assert delta("reconciler_pay_requests_total", outcome="order_already_paid") == 1
    # The webhook is answered in front of Flask (app/webhook_lane.py): its latency is the
    # ingest histogram above; Flask's endpoints keep theirs.
    assert delta("reconciler_http_request_seconds_count", endpoint="payments.pay", status="4xx") == 1
    # The inbox, read at scrape time: everything delivered was applied.
    assert value(after, "reconciler_inbox_events", status="received") == 0
    assert value(after, "reconciler_inbox_events", status="failed") == 0
    assert value(after, "reconciler_inbox_oldest_pending_seconds") == 0
    # read from the ledger at scrape time
    for status in ("open", "refunding", "refunded", "dismissed", "failed"):
        assert ("reconciler_duplicate_cases", (("status", status),)) in after


def test_cases_refunds_and_last_pass_come_from_the_database(client, session_factory) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from models import DuplicateCase, Order, ReconciliationRun, RefundAttempt, run_in_transaction, utcnow

    def seed(session):  # type: ignore[no-untyped-def]
        session.add(Order(id="ord_m", status="paid", version=1))
        session.flush()
        case = DuplicateCase(order_id="ord_m", status="refunded", keeper_charge_id="ch_k", excess={"jpy": 5000}, review_reasons=[])
        session.add(case)
        session.flush()
        session.add(RefundAttempt(idempotency_key="dup-refund-ch_d-1", charge_id="ch_d", n=1, case_id=case.id, amount=5000, currency="jpy", origin="auto", status="succeeded", calls=1))
        started = utcnow() - timedelta(seconds=42)
        session.add(ReconciliationRun(mode="auto", status="succeeded", started_at=started, finished_at=started + timedelta(seconds=12), counts={}, errors=[]))

    run_in_transaction(session_factory, seed)
    samples = scrape(client.get("/metrics", headers=METRICS_AUTH).get_data(as_text=True))
    assert value(samples, "reconciler_duplicate_cases", status="refunded") == 1
    assert value(samples, "reconciler_refunds", status="succeeded", currency="jpy") == 1
    assert value(samples, "reconciler_refunded_minor_units", currency="jpy") == 5000
    assert value(samples, "reconciler_last_pass_duration_seconds") == 12
    assert value(samples, "reconciler_last_pass_success") == 1


def test_counters_add_up_across_worker_processes(database_url, session_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_path = tmp_path / "serve.log"
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    with reconciler_serve(["--workers", "2", "--no-migrate"], env, log_path) as base:
        wait_for_workers(base, log_path, 2)

        def post(i: int) -> int:
            body = p.encode(p.event("charge.succeeded", p.charge(metadata={"order_id": f"ord_mp_{i}"})))
            return requests.post(
                f"{base}/webhooks/stripe",
                data=body,
                headers={"Stripe-Signature": p.sign(body, WEBHOOK_SECRET), "Content-Type": "application/json"},
                timeout=30,
            ).status_code

        with ThreadPoolExecutor(max_workers=4) as pool:  # sync workers: concurrency spreads them
            assert list(pool.map(post, range(20))) == [200] * 20
        # every scrape, whichever worker answers, sees all 20
        for _ in range(4):
            samples = scrape(requests.get(f"{base}/metrics", headers=METRICS_AUTH, timeout=10).text)
            assert value(samples, "reconciler_webhook_events_total", type="charge.succeeded", outcome="received") == 20
    answered = set(re.findall(r'pid=<(\d+)> .*"POST /webhooks/stripe', log_path.read_text()))
    assert len(answered) == 2  # both workers counted some of the 20
