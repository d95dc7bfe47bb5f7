"""Paybill and Till payments (C2B): a confirmation is stored before it is acknowledged, in the
ledger or the local spool, once per receipt number, which STK receipts share; the signed
paths; what is not money stays out of the money. Both engines, the real WSGI app."""

import base64
import json
import logging
import os
import subprocess
import sys

import pytest

from helpers import (
    API_KEY,
    BOTH_ENGINES,
    OTHER_KEY,
    PAYBILL,
    ROOT_DIR,
    SECRET,
    SimulatorApi,
    base_env,
    events_of,
    png_pixels,
    wait_for,
)
import cli as command_line
import fake_daraja as fake
from mpesa_devtools import simulator
from mpesa_gateway import c2b, daraja, recording
from mpesa_gateway.auth import CallbackSigner

ENGINES = BOTH_ENGINES
SHORTCODE = simulator.SANDBOX_SHORTCODE
ACK = {"ResultCode": 0, "ResultDesc": "Success"}


@pytest.fixture
def gateway_env(gateway_env, request):
    """Menu payments go to the sandbox's C2B shortcode (174379 cannot register URLs); the
    owner `other` has the account numbers starting POS; `default` has a webhook endpoint
    (its events are written, never sent: no sender)."""
    return dict(gateway_env, MPESA_C2B_SHORTCODE=PAYBILL, GATEWAY_C2B_ACCOUNT_PREFIXES="other:POS",
                GATEWAY_WEBHOOK_URLS="default:http://127.0.0.1:9/events",
                GATEWAY_WEBHOOK_SECRETS="default:whsec_" + "A" * 32,
                GATEWAY_WEBHOOK_ALLOW_PRIVATE="on", GATEWAY_WEBHOOK_SENDER="off",
                **getattr(request, "param", {}))


def confirmation(receipt="RKL51ZDR4F", **fields):
    body = {"TransactionType": "Pay Bill", "TransID": receipt, "TransTime": "20261121121325",
            "TransAmount": "5.00", "BusinessShortCode": SHORTCODE, "BillRefNumber": "INV001",
            "InvoiceNumber": "", "OrgAccountBalance": "25.00", "ThirdPartyTransID": "",
            "MSISDN": "2547 ***** 126", "FirstName": "NICHOLAS", "MiddleName": "",
            "LastName": ""}
    body.update(fields)
    return json.dumps(body).encode()


def path(gateway, kind="confirmation"):
    return "/" + gateway.services.signer.c2b_url(kind).split("/", 3)[3]


def post(gateway, raw, kind="confirmation", status=200):
    return gateway.testapp.post(path(gateway, kind), raw, content_type="application/json",
                                status=status)


def bodies(ledger):
    return ledger._read("SELECT receipt, outcome, body FROM c2b_bodies ORDER BY id")


def test_a_confirmation_is_kept_as_a_receipt_then_acknowledged(gateway):
    res = post(gateway, confirmation())
    assert res.json == ACK
    assert gateway.services.ledger.c2b_receipt("RKL51ZDR4F") == {
        "receipt": "RKL51ZDR4F", "amount": 5, "account": "INV001", "shortcode": SHORTCODE,
        "channel": "paybill", "paid_at": "2026-11-21T09:13:25Z",  # 12:13:25 in Nairobi
        "payer_name": "NICHOLAS", "msisdn": "2547 ***** 126", "anomalies": "",
        "owner": "default", "matched_tx_id": None,  # no payment has INV001 as its reference
        "received_at": gateway.services.ledger.c2b_receipt("RKL51ZDR4F")["received_at"]}
    assert [(b["receipt"], b["outcome"]) for b in bodies(gateway.services.ledger)] == [
        ("RKL51ZDR4F", "received")]


def test_the_same_confirmation_again_is_acknowledged_and_changes_nothing(gateway):
    post(gateway, confirmation())
    before = gateway.services.ledger.c2b_receipt("RKL51ZDR4F")
    res = post(gateway, confirmation(TransAmount="9.00", BillRefNumber="OTHER"))
    assert res.json == ACK
    assert gateway.services.ledger.c2b_receipt("RKL51ZDR4F") == before
    assert [b["outcome"] for b in bodies(gateway.services.ledger)] == ["received", "duplicate"]


def test_a_till_payment_is_kept_with_no_account(gateway):
    post(gateway, confirmation("RKT0000001", TransactionType="Buy Goods", BillRefNumber=""))
    row = gateway.services.ledger.c2b_receipt("RKT0000001")
    assert (row["channel"], row["account"], row["anomalies"]) == ("till", "", "")


@pytest.mark.parametrize("amount", ["1e1", " 10", "-5", "10.5", "0", "", 10, None])
def test_an_amount_that_is_not_whole_shillings_as_text_is_no_money(gateway, amount):
    post(gateway, confirmation(TransAmount=amount))
    row = gateway.services.ledger.c2b_receipt("RKL51ZDR4F")
    assert row["amount"] is None and "amount" in row["anomalies"].split(",")


@pytest.mark.parametrize("field, value", [("FirstName", "\ud800"), ("BillRefNumber", "INV\u0000001"),
                                          ("LastName", "x" * 5000)])
def test_a_hostile_text_field_is_kept_made_safe_and_acknowledged(gateway, field, value):
    """A lone surrogate or a NUL no database column takes, a huge name: the receipt is
    kept (both engines), never a 500 and never only in the spool."""
    assert post(gateway, confirmation(**{field: value})).json == ACK
    assert gateway.services.ledger.c2b_receipt("RKL51ZDR4F") is not None
    assert gateway.services.spool.depth() == 0


@pytest.mark.parametrize("raw", [
    confirmation(MSISDN="254712345126", FirstName="\ud800"),  # re-written: ASCII, no 500
    b"\xef\xbb\xbf" + confirmation(MSISDN="254712345126"),  # a BOM: does not parse
    confirmation(MSISDN="254712345126")[:-5],  # cut short: does not parse
    confirmation(MSISDN="254712345126").replace(b'"TransID"', b'"\xff"'),  # a bad byte
    b'{"MSISDN":"254712345126",' + confirmation()[1:],  # the key twice, the last masked
    confirmation(MSISDN=None).replace(b'"MSISDN": null', b'"Msisdn": "254712345126"'),
    confirmation(MSISDN="\u0662\u0665\u0664\u0667\u0661\u0662\u0663\u0664\u0665\u0661\u0662\u0666"),
    b'{"TransID":"RKL51ZDR4F","MSISDN":["254712345126"]}',  # not text: emptied
    b'{"TransID":"RKL51ZDR4F","MSISDN":254712345126.0}',
    b'{"TransID":"RKL51ZDR4F","Body":{"MSISDN":"254712345126"}}',  # at any depth
    b'[{"MSISDN":"254712345126"}]',  # not an object: phone-like runs masked
    b'{"MSISDN":"+254 712 345 126",',
], ids=["surrogate", "bom", "truncated", "bad-byte", "twice", "other-spelling", "arabic-digits",
        "list", "float", "nested", "top-level-list", "spaced-unparsed"])
def test_no_body_keeps_an_msisdn_in_clear_whatever_its_shape(gateway, raw):
    assert post(gateway, raw).json == ACK
    [stored] = bodies(gateway.services.ledger)
    kept = bytes(stored["body"])
    assert b"712345126" not in kept and "712345126" not in kept.decode("utf-8", "replace")
    assert "\u0667\u0661\u0662\u0663" not in kept.decode("utf-8", "replace")


def test_a_numeric_shortcode_is_read_as_its_digits(gateway):
    post(gateway, confirmation(BusinessShortCode=int(SHORTCODE)))
    row = gateway.services.ledger.c2b_receipt("RKL51ZDR4F")
    assert (row["shortcode"], row["anomalies"]) == (SHORTCODE, "")


@pytest.mark.parametrize("gateway_env", [{"MPESA_CALLBACK_IP_POLICY": "enforce",
                                          "MPESA_CALLBACK_IPS": "196.201.214.200"}],
                         indirect=True)
def test_the_callback_source_policy_holds_for_these_urls_too(gateway):
    gateway.testapp.post(path(gateway), confirmation(), content_type="application/json",
                         extra_environ={"REMOTE_ADDR": "203.0.113.9"}, status=403)
    assert bodies(gateway.services.ledger) == []
    gateway.testapp.post(path(gateway), confirmation(), content_type="application/json",
                         extra_environ={"REMOTE_ADDR": "196.201.214.200"}, status=200)


def test_a_c2b_signature_opens_no_callback_path(gateway):
    sig = path(gateway).rsplit("/", 1)[1]
    for tx_id in ("c2b:confirmation", "confirmation"):
        gateway.testapp.post(f"/callback/{tx_id}/{sig}", b"{}", content_type="application/json",
                             status=404)


def test_a_confirmation_for_another_shortcode_is_kept_and_flagged(gateway):
    post(gateway, confirmation(BusinessShortCode="999999"))
    assert "other_shortcode" in gateway.services.ledger.c2b_receipt("RKL51ZDR4F")["anomalies"]


@pytest.mark.parametrize("given, kept", [
    ("254712345126", "2547******126"),  # in clear: masked before it is stored
    ("0712345126", "2547******126"),
    (254712345126, "2547******126"),  # a JSON number, as Daraja's own examples show
    ("+254 712-345-126", "2547******126"),
    ("\uff12\uff15\uff14\uff17\uff11\uff12\uff13\uff14\uff15\uff11\uff12\uff16", "2547******126"),
    ("254712345126,254712345127", "******127"),
    ("2547 ***** 126", "2547 ***** 126"),  # v2, masked by Safaricom: as given
    ("25470****126", "25470****126"),
    ("a" * 64, "a" * 64),  # v1, hashed: as given
    ("71234", "unreadable"),
])
def test_the_msisdn_is_never_kept_or_logged_in_clear(gateway, given, kept, caplog):
    with caplog.at_level(logging.DEBUG):
        post(gateway, confirmation(MSISDN=given))
    assert gateway.services.ledger.c2b_receipt("RKL51ZDR4F")["msisdn"] == kept
    [stored] = bodies(gateway.services.ledger)
    assert b"712345126" not in bytes(stored["body"]) and "712345126" not in caplog.text
    assert json.loads(bytes(stored["body"]))["TransID"] == "RKL51ZDR4F"  # the rest as it came


@pytest.mark.parametrize("raw", [b"not json", b"[]", b'{"TransAmount": "5"}',
                                 b'{"TransID": "x y"}', b"[" * 5000 + b"]" * 5000,
                                 b'{"TransID": "RKL51ZDR4F"}'.decode().encode("utf-16")])
def test_a_body_that_names_no_receipt_is_stored_and_acknowledged(gateway, raw):
    assert post(gateway, raw).json == ACK  # M-Pesa never resends: keep it, say so
    assert [(b["receipt"], b["outcome"], bytes(b["body"])) for b in
            bodies(gateway.services.ledger)] == [(None, "malformed", raw)]
    assert gateway.services.ledger._read("SELECT * FROM c2b_receipts") == []


@pytest.mark.parametrize("bad", ["wrong-signature", "kind"])
def test_an_unsigned_path_is_not_found_and_stores_nothing(gateway, bad, caplog):
    good = path(gateway)
    target = (good.rsplit("/", 1)[0] + "/" + "0" * 32 if bad == "wrong-signature"
              else good.replace("/confirmation/", "/refund/"))
    with caplog.at_level(logging.WARNING):
        gateway.testapp.post(target, confirmation(), content_type="application/json",
                             status=404)
    assert bodies(gateway.services.ledger) == [] and caplog.text == ""


def test_validation_accepts(gateway):
    res = post(gateway, confirmation(OrgAccountBalance=""), kind="validation")
    assert res.json == {"ResultCode": "0", "ResultDesc": "Accepted"}
    assert bodies(gateway.services.ledger) == []  # the confirmation is what is kept


# --- one namespace with STK receipts ---------------------------------------------------------


def paid_callback(gateway, tx, receipt):
    body = {"Body": {"stkCallback": {
        "MerchantRequestID": tx["merchant_request_id"],
        "CheckoutRequestID": tx["checkout_request_id"], "ResultCode": 0, "ResultDesc": "ok",
        "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 10},
                                      {"Name": "MpesaReceiptNumber", "Value": receipt}]}}}}
    url = "/" + gateway.services.signer.url(tx["id"]).split("/", 3)[3]
    gateway.testapp.post(url, json.dumps(body), content_type="application/json", status=200)


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_an_stk_payment_s_receipt_is_its_own_not_a_second_one(gateway):
    tx = gateway.push({"phone": "0712345031", "amount": 10}).json
    paid_callback(gateway, tx, "UKQ3100001")
    assert post(gateway, confirmation("UKQ3100001")).json == ACK
    assert gateway.services.ledger.c2b_receipt("UKQ3100001") is None
    assert [b["outcome"] for b in bodies(gateway.services.ledger)] == ["stk_receipt"]


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)
def test_a_confirmation_before_the_stk_result_gives_the_receipt_to_the_payment(gateway):
    tx = gateway.push({"phone": "0712345032", "amount": 10}).json
    post(gateway, confirmation("UKQ3200002"))
    paid_callback(gateway, tx, "UKQ3200002")
    row = gateway.get(tx["id"]).json
    assert (row["status"], row["receipt"]) == ("succeeded", "UKQ3200002")  # not reused
    assert gateway.services.ledger.c2b_receipt("UKQ3200002") is None
    assert gateway.services.ledger._read(
        "SELECT tx_id, kind FROM receipts WHERE receipt = 'UKQ3200002'") == [
        {"tx_id": tx["id"], "kind": "stk"}]
    # One payment, told once: the confirmation's receipt.received (not sent yet) is gone.
    assert [e["type"] for e in events_of(gateway.services.ledger)
            if e["type"] == "receipt.received"] == []


# --- the ledger away -------------------------------------------------------------------------


def test_a_confirmation_while_the_ledger_is_away_is_spooled_acknowledged_and_kept_once(
        gateway, outage):
    outage.begin()
    try:
        assert post(gateway, confirmation("RKS0000001")).json == ACK  # on disk, then the 200
        [entry] = gateway.services.spool.pending()
    finally:
        outage.end()
    ledger = gateway.services.ledger

    def kept():
        try:  # the pool may still be reconnecting to the restarted server
            return ledger.c2b_receipt("RKS0000001")
        except ledger.Error:
            return None

    assert wait_for(kept, timeout=60, interval=0.2)["amount"] == 5
    wait_for(lambda: gateway.services.spool.depth() == 0, timeout=60, interval=0.2)
    recording.apply(ledger, entry)  # the same entry again (a replay cut short): no twice
    assert [b["outcome"] for b in bodies(ledger)] == ["received"]


def test_parse_turns_nairobi_time_into_utc_and_refuses_impossible_times():
    assert c2b.paid_at("20261231235959") == "2026-12-31T20:59:59Z"
    assert c2b.paid_at("20260230120000") is None and c2b.paid_at("2026-02-01") is None


# --- registering the URLs, and a payment from the menu -------------------------------------


def cli(env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    return subprocess.run([sys.executable, "mpesa_wsgi.py", *args], cwd=ROOT_DIR,
                          env=dict(clean, **env), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flag, version", [((), "v2"), (("--v1",), "v1")])
def test_register_c2b_registers_both_signed_urls(sim, tmp_path, flag, version):
    env = dict(base_env(sim.url, tmp_path / "r.db"), MPESA_C2B_SHORTCODE=PAYBILL)
    proc = cli(env, "register-c2b", *flag)
    assert proc.returncode == 0, proc.stderr
    assert f"register-c2b shortcode={PAYBILL} response_type=Completed api={version}:" \
           " registered" in proc.stdout
    signer = CallbackSigner(SECRET, env["MPESA_CALLBACK_BASE_URL"])
    assert sim.sim.registered_urls(PAYBILL) == {
        "ResponseType": "Completed", "ConfirmationURL": signer.c2b_url("confirmation"),
        "ValidationURL": signer.c2b_url("validation"), "version": version}


def test_register_c2b_explains_the_shortcode_daraja_will_not_register(sim, tmp_path):
    proc = cli(base_env(sim.url, tmp_path / "r.db"), "register-c2b")  # 174379
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    said = proc.stderr.strip().splitlines()[-1]  # after the INFO lines of the calls: one line
    assert said.startswith(f"register-c2b shortcode={simulator.SANDBOX_SHORTCODE}: ")
    assert "set MPESA_C2B_SHORTCODE to a C2B shortcode, 600984 in the sandbox" in said


def test_register_c2b_refuses_a_url_safaricom_would_refuse_before_calling(sim, tmp_path):
    env = dict(base_env(sim.url, tmp_path / "r.db", callback_base="http://mpesa.localhost:9"),
               MPESA_C2B_SHORTCODE=PAYBILL)
    proc = cli(env, "register-c2b")
    assert proc.returncode == 2 and "holds 'mpesa'" in proc.stderr
    assert sim.sim.stats()["c2b_registrations"] == 0 and sim.sim.registered_urls(PAYBILL) is None


def test_a_payment_from_the_menu_reaches_the_ledger(gateway, sim):
    """Register through the gateway's Daraja client, pay with the simulator's C2B simulate:
    the confirmation comes over a real socket and is kept."""
    signer = gateway.services.signer
    gateway.services.daraja.register_c2b(
        shortcode=PAYBILL, response_type="Completed",
        confirmation_url=signer.c2b_url("confirmation"),
        validation_url=signer.c2b_url("validation"))
    res = SimulatorApi(sim.url).simulate(shortcode=PAYBILL, amount=25, bill_ref="INV001")
    assert res.status == 200, res.data
    wait_for(lambda: sim.sim.c2b_confirmations, timeout=30, interval=0.1)
    receipt = json.loads(sim.sim.c2b_confirmations[0][1])["TransID"]
    kept = wait_for(lambda: gateway.services.ledger.c2b_receipt(receipt), timeout=30,
                    interval=0.1)
    assert (kept["amount"], kept["account"], kept["channel"], kept["anomalies"]) == (
        25, "INV001", "paybill", "")
    assert kept["msisdn"].startswith("2547 ") and "*****" in kept["msisdn"]  # v2: masked


# --- matched to a payment, owned, told, read ------------------------------------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
LATE = pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 60}], indirect=True)


@LATE
def test_a_paybill_receipt_is_its_payment_s_by_reference_and_is_told(gateway):
    tx = gateway.push({"phone": "0712345041", "amount": 10, "reference": "INV041"}).json
    post(gateway, confirmation("RKM0000041", BillRefNumber=" inv041 "))  # any case, trimmed
    kept = gateway.services.ledger.c2b_receipt("RKM0000041")
    assert (kept["matched_tx_id"], kept["owner"]) == (tx["id"], "default")
    assert gateway.get(tx["id"]).json["status"] == "pending"  # its own status is its own
    shown = gateway.get(tx["id"]).json["receipts"]
    assert [(r["receipt"], r["channel"], r["transaction_id"], r["amount"]) for r in shown] == [
        ("RKM0000041", "c2b", tx["id"], 5)]
    [event] = [e for e in events_of(gateway.services.ledger) if e["type"] == "receipt.received"]
    data = json.loads(bytes(event["body"]))["data"]
    assert (event["owner"], data["receipt"], data["transaction_id"]) == (
        "default", "RKM0000041", tx["id"])


@LATE
def test_a_reference_two_payments_share_is_ambiguous_and_matches_neither(gateway):
    gateway.push({"phone": "0712345042", "amount": 10, "reference": "INV042"})
    gateway.push({"phone": "0712345043", "amount": 10, "reference": "INV042"})
    post(gateway, confirmation("RKM0000042", BillRefNumber="INV042"))
    kept = gateway.services.ledger.c2b_receipt("RKM0000042")
    assert kept["matched_tx_id"] is None and "ambiguous_reference" in kept["anomalies"]


@LATE
def test_no_match_by_the_default_reference_a_till_or_an_old_payment(gateway):
    gateway.push({"phone": "0712345044", "amount": 10})  # reference: the default, Payment
    post(gateway, confirmation("RKM0000044", BillRefNumber="payment"))
    old = gateway.push({"phone": "0712345045", "amount": 10, "reference": "INV045"}).json
    gateway.push({"phone": "0712345046", "amount": 10, "reference": "TILL46"})
    post(gateway, confirmation("RKM0000046", TransactionType="Buy Goods",
                               BillRefNumber="TILL46"))
    gateway.clock.advance(31 * 24 * 3600)
    post(gateway, confirmation("RKM0000045", BillRefNumber="INV045"))
    for receipt in ("RKM0000044", "RKM0000045", "RKM0000046"):
        assert gateway.services.ledger.c2b_receipt(receipt)["matched_tx_id"] is None, receipt
    assert old["id"] not in {r["transaction_id"] for r in
                             gateway.testapp.get("/receipts", headers=AUTH).json["data"]}


@LATE
def test_a_prefix_s_owner_keeps_its_accounts_from_another_key_s_reference(gateway):
    gateway.push({"phone": "0712345055", "amount": 10, "reference": "POS-55"})  # default's
    post(gateway, confirmation("RKM0000055", BillRefNumber="POS-55"))
    kept = gateway.services.ledger.c2b_receipt("RKM0000055")
    assert (kept["owner"], kept["matched_tx_id"]) == ("other", None)


@LATE
def test_a_matched_receipt_for_another_amount_is_flagged(gateway):
    tx = gateway.push({"phone": "0712345056", "amount": 10, "reference": "INV056"}).json
    post(gateway, confirmation("RKM0000056", BillRefNumber="INV056", TransAmount="9"))
    kept = gateway.services.ledger.c2b_receipt("RKM0000056")
    assert (kept["matched_tx_id"], kept["anomalies"]) == (tx["id"], "amount_differs")


def test_an_unmatched_receipt_belongs_by_its_account_prefix_else_to_default(gateway):
    post(gateway, confirmation("RKM0000047", BillRefNumber="pos-17"))
    post(gateway, confirmation("RKM0000048", BillRefNumber="SHOP-17"))
    ledger = gateway.services.ledger
    assert ledger.c2b_receipt("RKM0000047")["owner"] == "other"
    assert ledger.c2b_receipt("RKM0000048")["owner"] == "default"
    # An owner without an endpoint is not told; the one with one is.
    told = [json.loads(bytes(e["body"]))["data"]["receipt"] for e in events_of(ledger)]
    assert told == ["RKM0000048"]


@LATE
def test_receipts_are_read_by_reference_by_any_route_and_only_by_their_owner(gateway):
    tx = gateway.push({"phone": "0712345049", "amount": 10, "reference": "INV049"}).json
    paid_callback(gateway, tx, "UKQ4900049")  # paid by the prompt...
    post(gateway, confirmation("RKM0000049", BillRefNumber="INV049"))  # ...and from the menu
    page = gateway.testapp.get("/receipts?reference=inv049", headers=AUTH).json
    assert {(r["receipt"], r["channel"]) for r in page["data"]} == {
        ("UKQ4900049", "stk"), ("RKM0000049", "c2b")}
    stk = next(r for r in page["data"] if r["channel"] == "stk")
    assert stk["msisdn"] == "2547******049" and stk["transaction_id"] == tx["id"]
    assert gateway.testapp.get("/receipts?channel=c2b", headers=AUTH).json["data"][0][
        "receipt"] == "RKM0000049"
    assert gateway.testapp.get("/receipts/RKM0000049", headers=AUTH).json["amount"] == 5
    gateway.testapp.get("/receipts/RKM0000049", headers=OTHER, status=404)  # not theirs
    assert gateway.testapp.get("/receipts", headers=OTHER).json["data"] == []
    gateway.testapp.get("/receipts?channel=card", headers=AUTH, status=400)
    gateway.testapp.get("/receipts", status=401)


def test_receipts_page_by_cursor_newest_first(gateway):
    for n in range(5):
        post(gateway, confirmation(f"RKP000000{n}", BillRefNumber=f"PAGE{n}"))
        gateway.clock.advance(1)
    seen, url = [], "/receipts?limit=2"
    while url:
        page = gateway.testapp.get(url, headers=AUTH).json
        seen += [r["receipt"] for r in page["data"]]
        url = page["next_cursor"] and f"/receipts?limit=2&cursor={page['next_cursor']}"
    assert seen == [f"RKP000000{n}" for n in reversed(range(5))]


VAULT_FAULT = {"Envelope": {"Body": {"Fault": {"faultstring": (
    "Execution of ServiceCallout SCO-AddURLVault failed. Reason: ResponseCode 409 is"
    " treated as error")}}}}  # the shape Daraja's proxy answers for 174379


@pytest.mark.parametrize("answer, says", [
    (fake.reply(500, VAULT_FAULT), "Daraja will not register URLs for 600984"),
    (fake.error(500, "500.003.1001", "Urls are already registered."),
     "already registered: production URLs are registered once"),
    (fake.error(500, "500.003.1001", "Duplicate notification info, SP ID is 1"),
     "Daraja refused it (500.003.1001: Duplicate notification info, SP ID is 1)"),
    (fake.reply(200, {"ResponseCode": "1", "ResponseDescription": "Failed"}),
     "Daraja refused it (1: Failed)"),
    (fake.reply(200, {}), "Daraja's answer did not say they were registered (HTTP 200)"),
    (fake.reply(200, {"ResponseDescription": "Failed"}),
     "Daraja's answer did not say they were registered (HTTP 200)"),
], ids=["vault-fault", "already", "duplicate", "non-zero", "empty", "no-code-failed"])
def test_register_c2b_says_what_each_daraja_answer_means(harness, answer, says):
    h = harness(oauth=[fake.token()], register=[answer])
    with pytest.raises(daraja.DarajaError) as refused:
        h.app.services.daraja.register_c2b(
            shortcode="600984", response_type="Completed",
            confirmation_url="https://pay.example.com/c2b/confirmation/x",
            validation_url="https://pay.example.com/c2b/validation/x")
    assert command_line.c2b_refusal(refused.value, "600984").startswith(says)
    assert h.fake.count("register") == 1  # never resent


@pytest.mark.parametrize("answer", [
    fake.reply(200, {"OriginatorCoversationID": "1", "ResponseCode": "0",
                     "ResponseDescription": "success"}),
    fake.reply(200, {"OriginatorCoversationID": "1", "ResponseCode": "00000000",
                     "ResponseDescription": "Success"}),
    fake.reply(200, {"ResponseDescription": "Success"}),  # a new account's, without a code
])
def test_register_c2b_takes_every_documented_success(harness, answer):
    h = harness(oauth=[fake.token()], register=[answer])
    assert h.app.services.daraja.register_c2b(
        shortcode="600984", response_type="Completed",
        confirmation_url="https://pay.example.com/c2b/confirmation/x",
        validation_url="https://pay.example.com/c2b/validation/x").lower() == "success"


# --- validation, when the merchant turns it on ------------------------------------------------

REFERENCE_RULE = pytest.mark.parametrize("gateway_env", [{"GATEWAY_C2B_VALIDATION": "reference"}],
                                         indirect=True)


def asks(gateway, **fields):
    """What the validation URL answers for a payment with these fields."""
    return post(gateway, confirmation(OrgAccountBalance="", **fields), kind="validation").json


@LATE
@REFERENCE_RULE
def test_the_reference_rule_accepts_only_one_payment_s_reference_at_its_amount(gateway):
    gateway.push({"phone": "0712345051", "amount": 10, "reference": "INV051"})
    gateway.push({"phone": "0712345052", "amount": 10, "reference": "INV052"})
    gateway.push({"phone": "0712345053", "amount": 10, "reference": "INV052"})
    accepted = {"ResultCode": "0", "ResultDesc": "Accepted"}
    assert asks(gateway, BillRefNumber="inv051", TransAmount="10.00") == accepted
    assert asks(gateway, BillRefNumber="INV051", TransAmount="11") == {
        "ResultCode": "C2B00013", "ResultDesc": "Invalid Amount"}
    for account in ("NOPE", "INV052", "Payment"):  # none, two, the default reference
        assert asks(gateway, BillRefNumber=account, TransAmount="10")["ResultCode"] == \
            "C2B00012", account
    assert asks(gateway, TransactionType="Buy Goods", BillRefNumber="") == accepted  # a Till
    assert bodies(gateway.services.ledger) == []  # asking keeps nothing


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("gateway_env", [
    {"GATEWAY_C2B_VALIDATION": "reference", "GATEWAY_DB_WAIT_S": "1",
     "MPESA_C2B_RESPONSE_TYPE": kind} for kind in ("Completed", "Cancelled")], indirect=True)
def test_an_undecided_validation_answers_as_the_response_type_says(gateway, outage, caplog):
    outage.begin()
    try:
        with caplog.at_level(logging.WARNING):
            answer = asks(gateway, BillRefNumber="INV054", TransAmount="10")
    finally:
        outage.end()
    expected = ("0" if gateway.services.config.c2b_response_type == "Completed"
                else "C2B00016")
    assert answer["ResultCode"] == expected
    assert "c2b validation undecided" in caplog.text


# --- a payment's Dynamic QR code -----------------------------------------------------------


def test_a_qr_code_pays_the_paybill_with_the_reference_as_account(gateway, sim):
    zxingcpp = pytest.importorskip("zxingcpp", reason="the QR reader zxing-cpp is not installed")
    res = gateway.testapp.post_json("/qr", {"amount": 250, "reference": "INV061", "size": 300},
                                    headers=AUTH, status=200).json
    assert (res["trx_code"], res["cpi"], res["reference"], res["amount"]) == (
        "PB", PAYBILL, "INV061", 250)
    assert res["text"] == f"Paybill {PAYBILL}, account INV061, KES 250"
    width, height, grey = png_pixels(base64.b64decode(res["image_png_base64"], validate=True))
    (found,) = zxingcpp.read_barcodes(memoryview(grey).cast("B", (height, width)))
    scanned = json.loads(found.text)  # the simulator's content: what Daraja was asked
    assert (scanned["TrxCode"], scanned["CPI"], scanned["RefNo"], scanned["Amount"]) == (
        "PB", PAYBILL, "INV061", 250)
    assert scanned["MerchantName"] == "Merchant"


@pytest.mark.parametrize("body, field", [
    ({"reference": "INV062"}, "amount"), ({"amount": 10}, "reference"),
    ({"amount": 0, "reference": "INV062"}, "amount"),
    ({"amount": 10, "reference": "INV062", "size": 5000}, "size"),
    ({"amount": 10, "reference": "INV062", "colour": "red"}, "colour"),
])
def test_a_qr_request_with_a_bad_field_is_400_and_asks_nothing(gateway, sim, body, field):
    before = sim.sim.stats()["qr_codes"]
    res = gateway.testapp.post_json("/qr", body, headers=AUTH, status=400).json
    assert res["error"]["field"] == field
    assert sim.sim.stats()["qr_codes"] == before
    gateway.testapp.post_json("/qr", {"amount": 10, "reference": "X"}, status=401)


def test_a_qr_code_answered_as_safaricom_s_own_sample_is_taken(harness):
    h = harness(oauth=[fake.token()], qr=[fake.reply(200, {
        "ResponseCode": "AG_20191219_000043fdf61864fe9ff5", "RequestID": "16738-27456357-1",
        "ResponseDescription": "QR Code Successfully Generated.", "QRCode": "iVBORw0KGgo="})])
    res = h.testapp.post_json("/qr", {"amount": 10, "reference": "INV064"}, headers=AUTH,
                              status=200).json
    assert res["image_png_base64"] == "iVBORw0KGgo="


def test_a_receipt_number_with_a_control_character_is_not_found(gateway):
    gateway.testapp.get("/receipts/%00", headers=AUTH, status=404)
    gateway.testapp.get("/receipts/RKL%0A1", headers=AUTH, status=404)


def test_a_qr_code_daraja_refuses_is_502_and_one_it_cannot_draw_is_503(harness):
    h = harness(oauth=[fake.token()], qr=[
        fake.reply(200, {"ResponseCode": "1", "ResponseDescription": "Invalid CPI"}),
        fake.error(503, "503.001.01", "Service Unavailable")])
    body = {"amount": 10, "reference": "INV063"}
    refused = h.testapp.post_json("/qr", body, headers=AUTH, status=502).json
    assert refused["error"]["code"] == "daraja_rejected"
    down = h.testapp.post_json("/qr", body, headers=AUTH, status=503)
    assert down.headers["Retry-After"]
