"""Smoke test: the real stripe-python SDK (16.x) against stripe-stateful-mock (0.0.16) running
as a Node process on 127.0.0.1 (see ``tests/emulator/stateful_mock_server.py``, whose
docstring sums up what these tests pin down).

One emulator process serves the whole module, and it has no flush: every test makes its own
charges and asserts on those, never on the whole store, except where noted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests
import stripe

from tests.emulator import StatefulMock

pytestmark = pytest.mark.e2e

API_KEY = "sk_test_stateful_mock_smoke"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mock() -> Iterator[StatefulMock]:
    with StatefulMock() as emulator:
        yield emulator


@pytest.fixture
def client(mock: StatefulMock) -> stripe.StripeClient:
    return stripe.StripeClient(
        API_KEY, base_addresses={"api": mock.base_url}, http_client=stripe.RequestsClient(), max_network_retries=0
    )


def new_key() -> str:
    return f"test-{uuid.uuid4()}"


def charge(client: stripe.StripeClient, amount: int = 5000, order_id: str | None = None) -> stripe.Charge:
    return client.v1.charges.create(
        params={
            "amount": amount,
            "currency": "usd",
            "source": "tok_visa",
            "metadata": {"order_id": order_id or f"order-{uuid.uuid4().hex[:8]}"},
        }
    )


def refunds_of(client: stripe.StripeClient, charge_id: str) -> list[stripe.Refund]:
    return list(client.v1.refunds.list(params={"charge": charge_id}).data)


# -- the harness -----------------------------------------------------------------------


def test_listens_on_loopback_only(mock: StatefulMock) -> None:
    assert mock.base_url.startswith("http://127.0.0.1:")
    assert mock.port and mock.base_url.endswith(f":{mock.port}")
    assert mock.log().startswith(f"STATEFUL_MOCK_READY {mock.base_url}")
    # Unauthenticated: 401 in Stripe's error shape; any sk_test_ key is accepted.
    response = requests.get(mock.base_url + "/v1/charges", timeout=5)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(mock.base_url + "/v1/charges", auth=("sk_test_anything", ""), timeout=5).status_code == 200
    assert requests.get(mock.base_url + "/v1/charges", auth=("sk_live_nope", ""), timeout=5).status_code == 401


def test_launcher_exits_when_its_python_parent_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed test run leaves no emulator behind (the launcher's stdin pipe closes)."""
    script = textwrap.dedent(
        """
        import sys, time
        from tests.emulator import StatefulMock
        mock = StatefulMock().start()
        print(mock.pid, mock.base_url, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its log directory is never cleaned up
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().split()
        assert line, "the child Python did not start the emulator"
        node_pid, base_url = int(line[0]), line[1]
        assert requests.get(base_url + "/v1/charges", auth=(API_KEY, ""), timeout=5).status_code == 200
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=5)
    deadline = time.monotonic() + 5
    while _alive(node_pid):
        assert time.monotonic() < deadline, f"launcher {node_pid} outlived its killed parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purpose once it no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- charges -----------------------------------------------------------------------------


def test_charge_with_tok_visa_keeps_metadata_and_real_created(client: stripe.StripeClient) -> None:
    before = int(time.time())
    created = charge(client, amount=4200, order_id="order-42")
    after = int(time.time())

    assert created.id.startswith("ch_")
    assert (created.amount, created.currency, created.status) == (4200, "usd", "succeeded")
    assert created.paid is True and created.captured is True
    assert created.amount_refunded == 0 and created.refunded is False
    assert created.metadata.to_dict() == {"order_id": "order-42"}
    assert before <= created.created <= after  # a real unix time, whole seconds
    assert created.payment_intent is None  # no PaymentIntents at all

    fetched = client.v1.charges.retrieve(created.id)
    assert fetched.metadata.to_dict() == {"order_id": "order-42"}
    assert fetched.created == created.created


def test_metadata_values_come_back_as_strings(client: stripe.StripeClient) -> None:
    created = client.v1.charges.create(
        params={"amount": 100, "currency": "usd", "source": "tok_visa", "metadata": {"order_id": "o", "n": 5}}
    )
    assert created.metadata.to_dict() == {"order_id": "o", "n": "5"}


def test_no_payment_intents(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.payment_intents.create(params={"amount": 1000, "currency": "usd"})
    assert info.value.http_status == 404
    assert "No matching path: /v1/payment_intents" in str(info.value.user_message)


def test_tok_429_is_a_rate_limit_error(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.RateLimitError) as info:
        client.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": "tok_429"})
    assert info.value.http_status == 429
    assert info.value.error is not None and info.value.error.type == "rate_limit_error"
    assert info.value.error.code == "rate_limit"
    assert info.value.user_message == "Too many requests in a period of time."


def test_tok_500_is_an_api_error_and_a_chain_fails_then_succeeds(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.APIError) as info:
        client.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": "tok_500"})
    assert type(info.value) is stripe.APIError
    assert info.value.http_status == 500
    assert info.value.user_message == "An unknown error occurred"

    # A chain is consumed one token per use of the same string, process-wide.
    chain = "tok_500|tok_visa"
    with pytest.raises(stripe.APIError):
        client.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": chain})
    second = client.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": chain})
    assert second.status == "succeeded"
    # Past its end: a bare 500 that is not in Stripe's error shape.
    with pytest.raises(stripe.APIError) as info:
        client.v1.charges.create(params={"amount": 1000, "currency": "usd", "source": chain})
    assert info.value.http_status == 500
    assert "can only be used 2 times" in str(info.value)


# -- refunds -----------------------------------------------------------------------------


def test_refund_has_reason_metadata_status_charge_and_updates_the_charge(client: stripe.StripeClient) -> None:
    ch = charge(client, amount=5000)
    refund = client.v1.refunds.create(
        params={"charge": ch.id, "amount": 2000, "reason": "duplicate", "metadata": {"case_id": "17"}},
        options={"idempotency_key": new_key()},
    )
    assert refund.id.startswith("re_")
    assert refund.object == "refund"
    assert (refund.amount, refund.currency, refund.charge) == (2000, "usd", ch.id)
    assert refund.status == "succeeded"
    assert refund.reason == "duplicate"
    assert refund.metadata.to_dict() == {"case_id": "17"}
    assert isinstance(refund.created, int) and abs(refund.created - time.time()) < 60

    partly = client.v1.charges.retrieve(ch.id)
    assert (partly.amount_refunded, partly.refunded) == (2000, False)
    assert [r.id for r in partly.refunds.data] == [refund.id]

    rest = client.v1.refunds.create(params={"charge": ch.id})  # no amount: what is left
    assert rest.amount == 3000
    full = client.v1.charges.retrieve(ch.id)
    assert (full.amount_refunded, full.refunded) == (5000, True)
    assert [r.id for r in full.refunds.data] == [rest.id, refund.id]  # newest first
    assert client.v1.refunds.retrieve(refund.id).id == refund.id


def test_idempotency_key_replays_the_same_refund(client: stripe.StripeClient) -> None:
    ch = charge(client, amount=5000)
    key = new_key()
    params = {"charge": ch.id, "amount": 1500, "reason": "duplicate", "metadata": {"case_id": "1"}}
    first = client.v1.refunds.create(params=params, options={"idempotency_key": key})
    again = client.v1.refunds.create(params=dict(params), options={"idempotency_key": key})

    assert again.id == first.id
    assert again.last_response is not None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert [r.id for r in refunds_of(client, ch.id)] == [first.id]
    assert client.v1.charges.retrieve(ch.id).amount_refunded == 1500

    # A new key is a new refund.
    other = client.v1.refunds.create(params=dict(params), options={"idempotency_key": new_key()})
    assert other.id != first.id
    assert len(refunds_of(client, ch.id)) == 2


def test_idempotency_key_with_different_parameters_is_an_idempotency_error(client: stripe.StripeClient) -> None:
    ch = charge(client, amount=5000)
    key = new_key()
    first = client.v1.refunds.create(
        params={"charge": ch.id, "amount": 1000, "reason": "duplicate"}, options={"idempotency_key": key}
    )
    with pytest.raises(stripe.IdempotencyError) as info:
        client.v1.refunds.create(
            params={"charge": ch.id, "amount": 1200, "reason": "duplicate"}, options={"idempotency_key": key}
        )
    error = info.value
    print(f"idempotency mismatch: {type(error).__name__} {error.http_status}: {error.user_message}")
    assert error.http_status == 400
    assert error.code is None
    assert error.error is not None and error.error.type == "idempotency_error"
    assert error.user_message == (
        "Keys for idempotent requests can only be used with the same parameters they were first used with."
        f" Try using a key other than '{key}' if you meant to execute a different request."
    )
    assert [r.id for r in refunds_of(client, ch.id)] == [first.id]
    assert client.v1.charges.retrieve(ch.id).amount_refunded == 1000


def test_over_refund_is_an_invalid_request_error(client: stripe.StripeClient) -> None:
    ch = charge(client, amount=5000)
    client.v1.refunds.create(params={"charge": ch.id, "amount": 3000})
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.refunds.create(params={"charge": ch.id, "amount": 2500}, options={"idempotency_key": new_key()})
    error = info.value
    print(f"over-refund: {type(error).__name__} {error.http_status} code={error.code}: {error.user_message}")
    assert error.http_status == 400
    assert error.code is None  # Stripe says amount_too_large here
    assert error.param == "amount"
    assert error.user_message == "Refund amount ($25) is greater than unrefunded amount on charge ($20)"
    assert client.v1.charges.retrieve(ch.id).amount_refunded == 3000

    client.v1.refunds.create(params={"charge": ch.id, "amount": 2000})
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.refunds.create(params={"charge": ch.id, "amount": 1})
    error = info.value
    print(f"refund of a refunded charge: {type(error).__name__} {error.http_status} code={error.code}: {error.user_message}")
    assert error.http_status == 400
    assert error.code == "charge_already_refunded"
    assert error.user_message == f"Charge {ch.id} has already been refunded."


def test_refunds_list_filters_by_charge(client: stripe.StripeClient) -> None:
    one, two = charge(client), charge(client)
    r1 = client.v1.refunds.create(params={"charge": one.id, "amount": 100})
    r2 = client.v1.refunds.create(params={"charge": one.id, "amount": 200})
    r3 = client.v1.refunds.create(params={"charge": two.id, "amount": 300})

    assert {r.id for r in refunds_of(client, one.id)} == {r1.id, r2.id}
    assert [r.id for r in refunds_of(client, two.id)] == [r3.id]
    everything = client.v1.refunds.list()
    assert {r1.id, r2.id, r3.id} <= {r.id for r in everything.data}
    assert everything.has_more is False
    # Paging refunds works (the list's url is /v1/refunds, which is right for refunds).
    paged = [r.id for r in client.v1.refunds.list(params={"charge": one.id, "limit": 1}).auto_paging_iter()]
    assert sorted(paged) == sorted([r1.id, r2.id])


# -- charges list ------------------------------------------------------------------------


def test_charges_list_has_no_default_limit_and_ignores_created(client: stripe.StripeClient) -> None:
    mine = [charge(client, amount=100 + i).id for i in range(12)]

    everything = client.v1.charges.list()
    ids = [c.id for c in everything.data]
    assert set(mine) <= set(ids)
    assert len(ids) >= 12  # Stripe would return 10 and has_more=True
    assert everything.has_more is False
    assert everything.url == "/v1/refunds"  # sic, for every list

    # Newest first by whole-second `created`; within one second, oldest first.
    created = {c.id: c.created for c in everything.data}
    assert [created[i] for i in ids] == sorted((created[i] for i in ids), reverse=True)
    for a, b in zip(mine, mine[1:]):
        if created[a] == created[b]:
            assert ids.index(a) < ids.index(b)

    limited = client.v1.charges.list(params={"limit": 3})
    assert len(limited.data) == 3 and limited.has_more is True
    after = client.v1.charges.list(params={"limit": 3, "starting_after": limited.data[-1].id})
    assert [c.id for c in after.data] == ids[3:6]

    # The created filter is ignored.
    future = int(time.time()) + 86400
    assert {c.id for c in client.v1.charges.list(params={"created": {"gt": future}}).data} == set(ids)


def test_charges_auto_paging_breaks_after_the_first_page(client: stripe.StripeClient) -> None:
    for i in range(3):
        charge(client, amount=200 + i)
    pages = client.v1.charges.list(params={"limit": 2}).auto_paging_iter()
    with pytest.raises(stripe.InvalidRequestError) as info:
        list(pages)
    assert info.value.http_status == 404
    assert info.value.param == "starting_after"
    assert str(info.value.user_message).startswith("No such refund: ch_")
