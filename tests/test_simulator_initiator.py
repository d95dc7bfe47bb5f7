"""The simulator's initiator APIs (Reversal, Transaction Status, Account Balance), over a
real loopback socket.

Each test talks HTTP to 127.0.0.1 only, as a merchant's code talks to Daraja: a token, the
initiator's certificate (GET /_sim/initiator/certificate), a SecurityCredential encrypted
with it (RSA, PKCS#1 v1.5, base64), then the request.  The ResultURL and QueueTimeOutURL
are a small WSGI app served the same way, recording every POST; STK callbacks and C2B
confirmations land there too, so a test can reverse or query a receipt the simulator
really issued.
"""

import base64
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from helpers import PAYBILL, ROOT_DIR, serve, wait_for
from helpers import SimulatorApi as Daraja
from mpesa_devtools import sim_initiator, simulator

PHONE = "254712345678"  # no scenario: the push succeeds
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=15.0))
RECEIPT = re.compile(r"[A-Z][A-L][1-9A-V][A-Z0-9]{7}")
NO_MONEY_ID = re.compile(r"[A-Z][A-L][1-9A-V]0000000")
CONVERSATION_ID = re.compile(r"AG_[0-9]{8}_[0-9a-f]{20}")
ACK_KEYS = {"OriginatorConversationID", "ConversationID", "ResponseCode", "ResponseDescription"}
PATHS = {"reversal": "/mpesa/reversal/v1/request",
         "status": "/mpesa/transactionstatus/v1/query",
         "balance": "/mpesa/accountbalance/v1/query"}
REVERSAL_KEYS = ["DebitAccountBalance", "Amount", "TransCompletedTime", "OriginalTransactionID",
                 "Charge", "CreditPartyPublicName", "DebitPartyPublicName"]
STATUS_KEYS = ["DebitPartyName", "CreditPartyName", "OriginatorConversationID", "InitiatedTime",
               "DebitAccountType", "DebitPartyCharges", "TransactionReason", "ReasonType",
               "TransactionStatus", "FinalisedTime", "Amount", "ConversationID", "ReceiptNo"]
CUSTOMER = "2547******678 - JOHN"  # PHONE, masked as the simulator masks callbacks


class Merchant:
    """The merchant's URLs (ResultURL, QueueTimeOutURL, an STK CallBackURL, C2B URLs):
    records each POST as (path, JSON body) and answers 200."""

    def __init__(self):
        self._lock = threading.Lock()
        self.posts = []
        self.url = None

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        with self._lock:
            self.posts.append((environ.get("PATH_INFO", ""), json.loads(body)))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"ResultCode": 0, "ResultDesc": "Accepted"}']

    def at(self, path):
        with self._lock:
            return [body for p, body in self.posts if p == path]

    def result_of(self, ack, path="/result"):
        """The Result POSTed for this acknowledgement (same ConversationID), once it came."""
        def find():
            return next((b["Result"] for b in self.at(path)
                         if b["Result"]["ConversationID"] == ack["ConversationID"]), None)
        return wait_for(find, timeout=8.0)


class Initiator:
    """A merchant's code calling the three APIs, with the bodies Daraja's docs show."""

    def __init__(self, daraja, merchant, credential):
        self.daraja, self.merchant, self.credential = daraja, merchant, credential

    def body(self, api, **changes):
        body = {"Initiator": simulator.SANDBOX_INITIATOR_NAME,
                "SecurityCredential": self.credential, "CommandID": {
                    "reversal": "TransactionReversal", "status": "TransactionStatusQuery",
                    "balance": "AccountBalance"}[api],
                "ResultURL": self.merchant.url + "/result",
                "QueueTimeOutURL": self.merchant.url + "/timeout", "Remarks": "OK"}
        if api == "reversal":
            body.update(TransactionID="UL7A2KQ9XZ", Amount="10", ReceiverParty=PAYBILL,
                        RecieverIdentifierType="11", Remarks="Payment reversal")
        elif api == "status":
            body.update(TransactionID="UL7A2KQ9XZ", PartyA=PAYBILL, IdentifierType="4",
                        Occasion="OK")
        else:
            body.update(PartyA=PAYBILL, IdentifierType="4")
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    def call(self, api, token=None, **changes):
        return self.daraja.call(PATHS[api], self.body(api, **changes), token=token)

    def ack(self, api, **changes):
        res = self.call(api, **changes)
        assert res.status == 200, res.data
        return res.json()

    def result(self, api, **changes):
        """Call, then wait for the Result; (acknowledgement, Result)."""
        ack = self.ack(api, **changes)
        return ack, self.merchant.result_of(ack)


def encrypt(pem, password):
    """A SecurityCredential: base64(RSA PKCS#1 v1.5 encryption of the password)."""
    key = x509.load_pem_x509_certificate(pem).public_key()
    return base64.b64encode(key.encrypt(password.encode(), padding.PKCS1v15())).decode()


def params(result):
    """A Result's parameters in order, [(Key, Value or None)]."""
    found = result["ResultParameters"]["ResultParameter"]
    return [(p["Key"], p.get("Value")) for p in ([found] if isinstance(found, dict) else found)]


def error(res):
    body = res.json()
    assert body["requestId"]
    return res.status, body["errorCode"], body["errorMessage"]


def now_stamp():
    return int(datetime.now(simulator.EAT).strftime("%Y%m%d%H%M%S"))


@pytest.fixture
def sim_settings(request):
    """Fast results and callbacks; a test may override fields with indirect parametrization."""
    overrides = getattr(request, "param", {})
    return simulator.SimSettings(**{"callback_delay_s": 0.2, "result_delay_s": 0.05,
                                    **overrides})


@pytest.fixture
def merchant():
    app = Merchant()
    server, url = serve(app)
    app.url = url
    yield app
    server.shutdown()


@pytest.fixture
def daraja(sim):
    return Daraja(sim.url)


@pytest.fixture
def pem(sim):
    res = HTTP.request("GET", sim.url + "/_sim/initiator/certificate")
    assert res.status == 200
    return res.data


@pytest.fixture
def initiator(daraja, merchant, pem):
    return Initiator(daraja, merchant, encrypt(pem, simulator.SANDBOX_INITIATOR_PASSWORD))


def stk_push(daraja, merchant, phone=PHONE, amount=10):
    """An accepted STK push (its callback comes to the merchant's /stk); its
    CheckoutRequestID."""
    timestamp = datetime.now(simulator.EAT).strftime("%Y%m%d%H%M%S")
    raw = simulator.SANDBOX_SHORTCODE + simulator.SANDBOX_PASSKEY + timestamp
    res = daraja.call("/mpesa/stkpush/v1/processrequest", {
        "BusinessShortCode": simulator.SANDBOX_SHORTCODE, "Timestamp": timestamp,
        "Password": base64.b64encode(raw.encode()).decode(),
        "TransactionType": "CustomerPayBillOnline", "Amount": amount, "PartyA": phone,
        "PartyB": simulator.SANDBOX_SHORTCODE, "PhoneNumber": phone,
        "CallBackURL": merchant.url + "/stk", "AccountReference": "INV001",
        "TransactionDesc": "Payment"})
    assert res.status == 200, res.data
    return res.json()["CheckoutRequestID"]


def stk_paid(daraja, merchant, phone=PHONE, amount=10):
    """A push the simulator decides succeeded: its MpesaReceiptNumber, once called back."""
    checkout = stk_push(daraja, merchant, phone, amount)
    stk = wait_for(lambda: next((b["Body"]["stkCallback"] for b in merchant.at("/stk")
                                 if b["Body"]["stkCallback"]["CheckoutRequestID"] == checkout),
                                None), timeout=8.0)
    assert stk["ResultCode"] == 0
    return {i["Name"]: i.get("Value") for i in stk["CallbackMetadata"]["Item"]}[
        "MpesaReceiptNumber"]


def c2b_paid(daraja, merchant, amount):
    """A Paybill payment to PAYBILL: its TransID, once confirmed."""
    before = len(merchant.at("/c2b/confirm"))
    daraja.paid(amount=amount)
    confirmations = wait_for(lambda: (c := merchant.at("/c2b/confirm")) and len(c) > before
                             and c, timeout=8.0)
    return confirmations[before]["TransID"]


def c2b_registered(daraja, merchant):
    res = daraja.register(confirmation=merchant.url + "/c2b/confirm",
                          validation=merchant.url + "/c2b/validate")
    assert res.status == 200, res.data


def settled(sim, **expected):
    """Wait until the simulator's counters show `expected`; return them."""
    return wait_for(lambda: (s := sim.stats()) and all(s[k] == v for k, v in expected.items())
                    and s, timeout=8.0)


# --- the acknowledgement and the synchronous refusals ----------------------------------

@pytest.mark.parametrize("api", ["reversal", "status", "balance"])
def test_each_api_acknowledges_then_posts_a_result_with_the_same_ids(initiator, merchant, api):
    day = datetime.now(simulator.EAT).strftime("%Y%m%d")
    ack = initiator.ack(api)
    assert set(ack) == ACK_KEYS
    assert (ack["ResponseCode"], ack["ResponseDescription"]) == (
        "0", "Accept the service request successfully.")
    assert CONVERSATION_ID.fullmatch(ack["ConversationID"])
    assert ack["ConversationID"][3:11] >= day
    assert ack["OriginatorConversationID"]
    result = merchant.result_of(ack)
    assert list(result) == ["ResultType", "ResultCode", "ResultDesc", "OriginatorConversationID",
                            "ConversationID", "TransactionID", *(
                                ["ResultParameters"] if "ResultParameters" in result else []),
                            "ReferenceData"]
    assert result["ResultType"] == 0
    assert result["OriginatorConversationID"] == ack["OriginatorConversationID"]
    assert merchant.at("/timeout") == []


def test_two_requests_get_different_ids(initiator):
    first, second = initiator.ack("balance"), initiator.ack("balance")
    assert first["ConversationID"] != second["ConversationID"]
    assert first["OriginatorConversationID"] != second["OriginatorConversationID"]


@pytest.mark.parametrize("token", [False, "not-a-token"])
def test_reversal_refuses_a_bad_token_as_stk_does(initiator, sim, token):
    assert error(initiator.call("reversal", token=token)) == (
        404, "404.001.03", "Invalid Access Token")
    settled(sim, reversals=1)


@pytest.mark.parametrize("api", ["status", "balance"])
@pytest.mark.parametrize("token", [False, "not-a-token"])
def test_the_queries_refuse_a_bad_token_with_401_echoing_it(initiator, sim, merchant, api,
                                                            token):
    status, code, message = error(initiator.call(api, token=token))
    assert (status, code) == (401, "401.002.01")
    assert message == "Error Occurred - Invalid Access Token - " + (token or "")
    stats = sim.stats()
    assert (stats["initiator_results_sent"], merchant.posts) == (0, [])


def test_an_expired_token_is_refused(initiator, sim):
    initiator.daraja.token()
    sim.sim.revoke_tokens()
    assert error(initiator.call("balance"))[:2] == (401, "401.002.01")


@pytest.mark.parametrize("api, changes, field_name", [
    ("reversal", {"Initiator": None}, "Initiator"),
    ("reversal", {"Initiator": " "}, "Initiator"),
    ("reversal", {"SecurityCredential": None}, "SecurityCredential"),
    ("reversal", {"SecurityCredential": 12}, "SecurityCredential"),
    ("reversal", {"CommandID": "TransactionStatusQuery"}, "CommandID"),
    ("reversal", {"CommandID": None}, "CommandID"),
    ("reversal", {"TransactionID": None}, "TransactionID"),
    ("reversal", {"TransactionID": "UL7A-2KQ9"}, "TransactionID"),
    ("reversal", {"Amount": None}, "Amount"),
    ("reversal", {"Amount": "10.50"}, "Amount"),
    ("reversal", {"Amount": 10.0}, "Amount"),
    ("reversal", {"Amount": 0}, "Amount"),
    ("reversal", {"Amount": True}, "Amount"),
    ("reversal", {"ReceiverParty": None}, "ReceiverParty"),
    ("reversal", {"ReceiverParty": "1234"}, "ReceiverParty"),
    ("reversal", {"RecieverIdentifierType": "4"}, "RecieverIdentifierType"),
    # Daraja's spelling is the only one: the correct one is an unknown field
    ("reversal", {"RecieverIdentifierType": None, "ReceiverIdentifierType": "11"},
     "RecieverIdentifierType"),
    ("reversal", {"ResultURL": "ftp://127.0.0.1/result"}, "ResultURL"),
    ("reversal", {"ResultURL": None}, "ResultURL"),
    ("reversal", {"QueueTimeOutURL": "/timeout"}, "QueueTimeOutURL"),
    ("reversal", {"QueueTimeOutURL": "http://127.0.0.1:9/time out"}, "QueueTimeOutURL"),
    ("reversal", {"Remarks": None}, "Remarks"),
    ("reversal", {"Remarks": "x"}, "Remarks"),
    ("reversal", {"Remarks": "x" * 101}, "Remarks"),
    ("status", {"TransactionID": None}, "TransactionID"),
    ("status", {"TransactionID": ""}, "TransactionID"),
    ("status", {"TransactionID": ["UL7A2KQ9XZ"]}, "TransactionID"),
    ("status", {"OriginalConversationID": 7}, "OriginalConversationID"),
    ("status", {"CommandID": "TransactionReversal"}, "CommandID"),
    ("status", {"PartyA": None}, "PartyA"),
    ("status", {"PartyA": "60098A"}, "PartyA"),
    ("status", {"IdentifierType": "11"}, "IdentifierType"),
    ("status", {"Remarks": "x"}, "Remarks"),
    ("status", {"Occasion": "x" * 101}, "Occasion"),
    ("status", {"QueueTimeOutURL": None}, "QueueTimeOutURL"),
    ("balance", {"Initiator": None}, "Initiator"),
    ("balance", {"CommandID": "AccountBalance "}, "CommandID"),
    ("balance", {"PartyA": None}, "PartyA"),
    ("balance", {"IdentifierType": None}, "IdentifierType"),
    ("balance", {"IdentifierType": "3"}, "IdentifierType"),
    ("balance", {"ResultURL": "127.0.0.1:9/result"}, "ResultURL"),
])
def test_an_invalid_field_is_refused_by_name_and_nothing_is_posted(initiator, sim, merchant,
                                                                   api, changes, field_name):
    assert error(initiator.call(api, **changes)) == (
        400, "400.002.02", f"Bad Request - Invalid {field_name}")
    initiator.result("balance")  # a later request's result comes, and only it
    assert len(merchant.at("/result")) == 1 and merchant.at("/timeout") == []


@pytest.mark.parametrize("api, changes", [
    ("reversal", {"Amount": 10, "ReceiverParty": int(PAYBILL), "RecieverIdentifierType": 11}),
    ("status", {"PartyA": int(PAYBILL), "IdentifierType": 4, "Remarks": None,
                "Occasion": None}),
    ("status", {"TransactionID": None, "OriginalConversationID": "7071-4170-a0e5-8345632b"}),
    ("status", {"PartyA": PHONE, "IdentifierType": "1"}),
    ("balance", {"PartyA": int(PAYBILL), "IdentifierType": 4, "Remarks": None}),
])
def test_loose_types_and_optional_fields_are_accepted(initiator, api, changes):
    assert initiator.ack(api, **changes)["ResponseCode"] == "0"


def test_a_body_that_is_not_json_or_not_an_object_is_refused(initiator, daraja):
    res = HTTP.request("POST", daraja.url + PATHS["balance"], body=b'{"Initiator": "testapi"}',
                       headers={"Authorization": f"Bearer {daraja.token()}",
                                "Content-Type": "text/plain"})
    assert error(res) == (400, "400.002.02", "Bad Request - Invalid Initiator")
    for body in (b"not json", b"[1, 2]"):
        assert error(daraja.call(PATHS["reversal"], body))[:2] == (400, "400.002.05")


# --- the SecurityCredential and the lock -------------------------------------------------

def test_a_credential_made_with_openssl_as_the_docs_say_is_accepted(initiator, sim, pem,
                                                                    tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert = tmp_path / "cert.pem"
    cert.write_bytes(pem)
    encrypted = subprocess.run(
        [openssl, "pkeyutl", "-encrypt", "-pkeyopt", "rsa_padding_mode:pkcs1", "-certin",
         "-inkey", str(cert)], input=simulator.SANDBOX_INITIATOR_PASSWORD.encode(),
        capture_output=True, check=True, timeout=60).stdout
    _, result = initiator.result("balance",
                                 SecurityCredential=base64.b64encode(encrypted).decode())
    assert result["ResultCode"] == 0


def wrong_credentials(pem):
    """name → (Initiator, SecurityCredential) that must be refused with 2001."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    good = simulator.SANDBOX_INITIATOR_PASSWORD
    return {
        "wrong password": ("testapi", encrypt(pem, "Safaricom999!*!")),
        "wrong initiator": ("apiop37", encrypt(pem, good)),
        "password and a timestamp": ("testapi", encrypt(pem, good + "20261207110400")),
        "another key": ("testapi", base64.b64encode(
            other.encrypt(good.encode(), padding.PKCS1v15())).decode()),
        "OAEP padding": ("testapi", base64.b64encode(x509.load_pem_x509_certificate(pem)
                         .public_key().encrypt(good.encode(), padding.OAEP(
                             padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))).decode()),
        "not base64": ("testapi", "not base64!"),
        "the password itself": ("testapi", good),
    }


@pytest.mark.parametrize("case", ["wrong password", "wrong initiator",
                                  "password and a timestamp", "another key", "OAEP padding",
                                  "not base64", "the password itself"])
def test_a_wrong_credential_is_acknowledged_then_answered_2001(initiator, sim, pem, case):
    name, credential = wrong_credentials(pem)[case]
    ack, result = initiator.result("reversal", Initiator=name, SecurityCredential=credential)
    assert ack["ResponseCode"] == "0"
    assert (result["ResultCode"], result["ResultDesc"]) == (
        2001, "The initiator information is invalid.")
    assert NO_MONEY_ID.fullmatch(result["TransactionID"])
    assert "ResultParameters" not in result
    assert sim.sim.initiator() == {"mode": "normal", "result_delay_s": 0.05,
                                   "single_parameter": False, "locked": False, "failures": 1}
    settled(sim, initiator_credential_failures=1, initiator_results_sent=1)


def wrong(pem):
    """A well-made credential holding the wrong password (the sandbox's older one)."""
    return encrypt(pem, "Safaricom999!*!")


def test_five_refusals_in_a_row_lock_the_initiator_until_unlocked(initiator, sim, daraja, pem):
    for _ in range(sim_initiator.LOCK_AFTER):
        _, result = initiator.result("balance", SecurityCredential=wrong(pem))
        assert result["ResultCode"] == 2001
    assert sim.sim.initiator()["locked"] is True
    for api in ("balance", "reversal", "status"):  # a good credential too
        _, result = initiator.result(api)
        assert (result["ResultCode"], result["ResultDesc"]) == (
            8006, "The security credential is locked.")
        assert result["TransactionID"] == "XXXXXXXXXX"
        assert "ResultParameters" not in result
    _, result = initiator.result("balance", SecurityCredential=wrong(pem))
    assert result["ResultCode"] == 8006  # still locked: no longer counted
    settled(sim, initiator_credential_failures=5)
    res = daraja.call("/_sim/initiator", {"unlock": True}, token=False)
    assert res.status == 200
    assert (res.json()["locked"], res.json()["failures"]) == (False, 0)
    assert initiator.result("balance")[1]["ResultCode"] == 0
    for _ in range(sim_initiator.LOCK_AFTER):  # and again, unlocked from Python this time
        initiator.result("balance", SecurityCredential=wrong(pem))
    assert initiator.result("balance")[1]["ResultCode"] == 8006
    assert sim.sim.unlock_initiator()["locked"] is False
    assert initiator.result("balance")[1]["ResultCode"] == 0


def test_a_good_credential_starts_the_count_again(initiator, sim, pem):
    for good in (False,) * 4 + (True,) + (False,) * 4:
        credential = initiator.credential if good else wrong(pem)
        assert initiator.result("balance", SecurityCredential=credential)[1]["ResultCode"] == (
            0 if good else 2001)
    assert (sim.sim.initiator()["locked"], sim.sim.initiator()["failures"]) == (False, 4)


@pytest.mark.parametrize("sim_settings", [{"initiator_name": "apiop37",
                                           "initiator_password": "Other#pass1"}], indirect=True)
def test_the_initiator_name_and_password_are_settings(initiator, pem):
    _, result = initiator.result("balance")  # the sandbox's: refused here
    assert result["ResultCode"] == 2001
    _, result = initiator.result("balance", Initiator="apiop37",
                                 SecurityCredential=encrypt(pem, "Other#pass1"))
    assert result["ResultCode"] == 0


# --- Reversal -------------------------------------------------------------------------

def test_a_succeeded_stk_push_is_reversed_once(initiator, daraja, merchant, sim):
    receipt = stk_paid(daraja, merchant, amount=10)
    before = now_stamp()
    ack, result = initiator.result("reversal", TransactionID=receipt, Amount="10",
                                   ReceiverParty=simulator.SANDBOX_SHORTCODE)
    assert (result["ResultCode"], result["ResultDesc"]) == (
        0, "The service request is processed successfully.")
    assert RECEIPT.fullmatch(result["TransactionID"]) and result["TransactionID"] != receipt
    found = params(result)
    assert [k for k, _ in found] == REVERSAL_KEYS
    values = dict(found)
    assert before <= values["TransCompletedTime"] <= now_stamp()
    assert values == {
        "DebitAccountBalance": "Utility Account|KES|0.00|0.00|0.00|0.00",
        "Amount": 10, "TransCompletedTime": values["TransCompletedTime"],
        "OriginalTransactionID": receipt, "Charge": 0, "CreditPartyPublicName": CUSTOMER,
        "DebitPartyPublicName": f"{simulator.SANDBOX_SHORTCODE} - Simulator Merchant"}
    assert result["ReferenceData"] == {"ReferenceItem": {
        "Key": "QueueTimeoutURL",
        "Value": "https://internalsandbox.safaricom.co.ke/mpesa/reversalresults/v1/submit"}}
    _, again = initiator.result("reversal", TransactionID=receipt, Amount="10",
                                ReceiverParty=simulator.SANDBOX_SHORTCODE)
    assert (again["ResultCode"], again["ResultDesc"]) == (
        "R000001", "The transaction has already been reversed.")
    assert NO_MONEY_ID.fullmatch(again["TransactionID"])
    assert "ResultParameters" not in again
    settled(sim, reversals=2, initiator_results_sent=2)


def test_a_c2b_payment_is_reversed_and_the_balance_follows(initiator, daraja, merchant):
    c2b_registered(daraja, merchant)
    trans_id = c2b_paid(daraja, merchant, 25)
    c2b_paid(daraja, merchant, 7)
    _, result = initiator.result("reversal", TransactionID=trans_id, Amount=25)
    assert result["ResultCode"] == 0
    values = dict(params(result))
    assert (values["OriginalTransactionID"], values["Amount"]) == (trans_id, 25)
    assert values["DebitAccountBalance"] == "Utility Account|KES|7.00|7.00|0.00|0.00"
    assert values["DebitPartyPublicName"] == f"{PAYBILL} - Simulator Merchant"
    assert values["CreditPartyPublicName"] == CUSTOMER


def test_an_unknown_receipt_is_r000002(initiator):
    _, result = initiator.result("reversal", TransactionID="UL7A2KQ9XZ")
    assert (result["ResultCode"], result["ResultDesc"]) == (
        "R000002", "The OriginalTransactionID is invalid.")
    assert "ResultParameters" not in result


def test_an_amount_that_is_not_the_originals_is_25_and_reverses_nothing(initiator, daraja,
                                                                         merchant):
    receipt = stk_paid(daraja, merchant, amount=10)
    _, result = initiator.result("reversal", TransactionID=receipt, Amount="9")
    assert result["ResultCode"] == sim_initiator.WRONG_AMOUNT[0] == 25
    assert result["ResultDesc"] == sim_initiator.WRONG_AMOUNT[1]
    assert initiator.result("status", TransactionID=receipt)[1]["ResultParameters"][
        "ResultParameter"][8] == {"Key": "TransactionStatus", "Value": "Completed"}
    assert initiator.result("reversal", TransactionID=receipt, Amount="10")[1][
        "ResultCode"] == 0


def test_a_reversal_cannot_be_reversed(initiator, daraja, merchant):
    receipt = stk_paid(daraja, merchant)
    reversal = initiator.result("reversal", TransactionID=receipt)[1]["TransactionID"]
    assert initiator.result("reversal", TransactionID=reversal)[1]["ResultCode"] == "R000002"


@pytest.mark.parametrize("phone", ["254711000001", "254711001032"])  # failed pushes
def test_a_failed_push_is_no_money_received(initiator, daraja, merchant, sim, phone):
    stk_push(daraja, merchant, phone)
    settled(sim, callbacks_sent=1)
    _, result = initiator.result("balance", PartyA=simulator.SANDBOX_SHORTCODE)
    assert dict(params(result))["AccountBalance"].split("&")[1] == (
        "Utility Account|KES|0.00|0.00|0.00|0.00")


# --- Transaction Status -----------------------------------------------------------------

def test_status_of_a_push_is_completed_then_reversed(initiator, daraja, merchant):
    before = now_stamp()
    receipt = stk_paid(daraja, merchant, amount=15)
    _, result = initiator.result("status", TransactionID=receipt)
    assert (result["ResultCode"], result["ResultDesc"]) == (
        0, "The service request is processed successfully.")
    assert NO_MONEY_ID.fullmatch(result["TransactionID"])
    found = params(result)
    assert [k for k, _ in found] == STATUS_KEYS
    values = dict(found)
    assert before <= values["InitiatedTime"] <= values["FinalisedTime"] <= now_stamp()
    assert CONVERSATION_ID.fullmatch(values["ConversationID"])
    assert {k: v for k, v in values.items()
            if k not in ("InitiatedTime", "FinalisedTime", "ConversationID")} == {
        "DebitPartyName": CUSTOMER,
        "CreditPartyName": f"{simulator.SANDBOX_SHORTCODE} - Simulator Merchant",
        "OriginatorConversationID": None, "DebitAccountType": "MMF Account For Customer",
        "DebitPartyCharges": None, "TransactionReason": None,
        "ReasonType": "Lipa Na M-Pesa Online", "TransactionStatus": "Completed",
        "Amount": 15, "ReceiptNo": receipt}
    # Keys without a Value, as Daraja sends them
    assert {"Key": "TransactionReason"} in result["ResultParameters"]["ResultParameter"]
    assert result["ReferenceData"] == {"ReferenceItem": {"Key": "Occasion"}}

    reversal_ack, reversal = initiator.result("reversal", TransactionID=receipt, Amount=15)
    assert reversal["ResultCode"] == 0
    _, result = initiator.result("status", TransactionID=receipt)
    assert dict(params(result))["TransactionStatus"] == "Reversed"
    # the reversal is a transaction too: by its receipt, or by the reversal's
    # OriginatorConversationID alone
    for query in ({"TransactionID": reversal["TransactionID"]},
                  {"TransactionID": None,
                   "OriginalConversationID": reversal_ack["OriginatorConversationID"]}):
        values = dict(params(initiator.result("status", **query)[1]))
        assert (values["ReceiptNo"], values["ReasonType"], values["TransactionStatus"]) == (
            reversal["TransactionID"], "Reversal", "Completed")
        assert (values["DebitPartyName"], values["CreditPartyName"]) == (
            f"{simulator.SANDBOX_SHORTCODE} - Simulator Merchant", CUSTOMER)
        assert values["DebitAccountType"] == "Utility Account"


def test_status_of_a_c2b_payment(initiator, daraja, merchant):
    c2b_registered(daraja, merchant)
    trans_id = c2b_paid(daraja, merchant, 30)
    values = dict(params(initiator.result("status", TransactionID=trans_id)[1]))
    assert (values["ReceiptNo"], values["Amount"], values["ReasonType"]) == (
        trans_id, 30, "Pay Bill Online")
    assert values["CreditPartyName"] == f"{PAYBILL} - Simulator Merchant"


@pytest.mark.parametrize("query", [{"TransactionID": "UL7A2KQ9XZ"},
                                   {"TransactionID": None, "OriginalConversationID": "nope"}])
def test_status_of_an_unknown_receipt_is_2032(initiator, query):
    _, result = initiator.result("status", **query)
    assert (result["ResultCode"], result["ResultDesc"]) == (
        2032, "The transaction receipt number does not exist.")
    assert "ResultParameters" not in result
    assert result["ReferenceData"] == {"ReferenceItem": {"Key": "Occasion"}}


@pytest.mark.parametrize("sim_settings", [{"callback_delay_s": 1.0}], indirect=True)
def test_a_push_is_money_received_only_once_decided(initiator, daraja, merchant):
    stk_push(daraja, merchant)

    def utility():
        result = initiator.result("balance", PartyA=simulator.SANDBOX_SHORTCODE)[1]
        return dict(params(result))["AccountBalance"].split("&")[1]

    assert utility() == "Utility Account|KES|0.00|0.00|0.00|0.00"  # the prompt is open
    wait_for(lambda: merchant.at("/stk"), timeout=8.0)
    assert utility() == "Utility Account|KES|10.00|10.00|0.00|0.00"


# --- Account Balance -----------------------------------------------------------------

def test_balance_packs_the_accounts_with_the_money_received(initiator, daraja, merchant):
    c2b_registered(daraja, merchant)
    c2b_paid(daraja, merchant, 25)
    c2b_paid(daraja, merchant, 5)
    before = now_stamp()
    _, result = initiator.result("balance")
    assert result["ResultCode"] == 0
    assert NO_MONEY_ID.fullmatch(result["TransactionID"])
    found = params(result)
    assert [k for k, _ in found] == ["AccountBalance", "BOCompletedTime"]
    values = dict(found)
    assert values["AccountBalance"] == (
        "Working Account|KES|0.00|0.00|0.00|0.00"
        "&Utility Account|KES|30.00|30.00|0.00|0.00"
        "&Charges Paid Account|KES|0.00|0.00|0.00|0.00")
    assert before <= values["BOCompletedTime"] <= now_stamp()
    assert result["ReferenceData"] == {"ReferenceItem": {
        "Key": "QueueTimeoutURL",
        "Value": "https://internalsandbox.safaricom.co.ke/mpesa/abresults/v1/submit"}}
    other = dict(params(initiator.result("balance", PartyA="600000")[1]))
    assert "&Utility Account|KES|0.00|0.00|0.00|0.00&" in other["AccountBalance"]


# --- control: single parameter, timeout, silent, delay -----------------------------------

def test_single_parameter_sends_the_first_parameter_as_an_object(initiator, daraja, sim):
    res = daraja.call("/_sim/initiator", {"single_parameter": True}, token=False)
    assert (res.status, res.json()["single_parameter"]) == (200, True)
    _, result = initiator.result("balance")
    parameter = result["ResultParameters"]["ResultParameter"]
    assert isinstance(parameter, dict) and parameter["Key"] == "AccountBalance"
    sim.sim.set_initiator(single_parameter=False)
    _, result = initiator.result("balance")
    assert isinstance(result["ResultParameters"]["ResultParameter"], list)


def test_timeout_mode_posts_to_the_queue_timeout_url_and_processes_nothing(initiator, daraja,
                                                                          merchant, sim):
    receipt = stk_paid(daraja, merchant)
    assert sim.sim.set_initiator(mode="timeout")["mode"] == "timeout"
    ack = initiator.ack("reversal", TransactionID=receipt)
    result = merchant.result_of(ack, path="/timeout")
    assert (result["ResultCode"], result["ResultDesc"]) == sim_initiator.QUEUE_TIMEOUT == (
        "SIM_QUEUE_TIMEOUT", "The request timed out in the queue.")
    assert result["ResultType"] == 0
    assert result["OriginatorConversationID"] == ack["OriginatorConversationID"]
    assert "ResultParameters" not in result
    assert result["ReferenceData"]["ReferenceItem"]["Key"] == "QueueTimeoutURL"
    sim.sim.set_initiator(mode="normal")
    values = dict(params(initiator.result("status", TransactionID=receipt)[1]))
    assert values["TransactionStatus"] == "Completed"  # the reversal never happened
    assert len(merchant.at("/result")) == 1 and len(merchant.at("/timeout")) == 1
    settled(sim, initiator_timeouts_sent=1, initiator_results_sent=1)


def test_silent_mode_processes_but_posts_nothing(initiator, daraja, merchant, sim):
    receipt = stk_paid(daraja, merchant)
    res = daraja.call("/_sim/initiator", {"mode": "silent"}, token=False)
    assert res.json()["mode"] == "silent"
    assert initiator.ack("reversal", TransactionID=receipt)["ResponseCode"] == "0"
    assert initiator.ack("balance")["ResponseCode"] == "0"
    sim.sim.set_initiator(mode="normal")
    values = dict(params(initiator.result("status", TransactionID=receipt)[1]))
    assert values["TransactionStatus"] == "Reversed"  # it happened; nobody was told
    assert len(merchant.at("/result")) == 1 and merchant.at("/timeout") == []
    stats = settled(sim, initiator_results_sent=1)
    assert (stats["reversals"], stats["account_balance"], stats["transaction_status"]) == (1, 1, 1)


def test_the_result_comes_after_the_result_delay(initiator, merchant, sim):
    sim.sim.set_initiator(result_delay_s=0.6)
    started = time.monotonic()
    ack = initiator.ack("balance")
    merchant.result_of(ack)
    assert time.monotonic() - started >= 0.6


def test_a_result_the_merchant_cannot_take_is_counted_and_never_resent(initiator, sim):
    ack = initiator.ack("balance", ResultURL="http://127.0.0.1:9/result")
    assert ack["ResponseCode"] == "0"
    stats = settled(sim, initiator_results_failed=1)
    assert stats["initiator_results_sent"] == 0 and sim.sim.initiator_results == []


def test_the_control_endpoint_shows_and_changes_partially(daraja, sim):
    res = daraja.call("/_sim/initiator", method="GET", token=False)
    assert res.json() == {"mode": "normal", "result_delay_s": 0.05, "single_parameter": False,
                          "locked": False, "failures": 0}
    res = daraja.call("/_sim/initiator", {"mode": "timeout", "result_delay_s": 2},
                      token=False)
    assert res.json() == {"mode": "timeout", "result_delay_s": 2.0, "single_parameter": False,
                          "locked": False, "failures": 0}
    assert sim.sim.set_initiator(single_parameter=True)["mode"] == "timeout"
    assert sim.sim.initiator()["single_parameter"] is True


@pytest.mark.parametrize("body", [
    {"mode": "stormy"},
    {"mode": None},
    {"result_delay_s": -1},
    {"result_delay_s": "1"},
    {"result_delay_s": 601},
    {"single_parameter": "yes"},
    {"unlock": 1},
    {"colour": "red"},
    {"mode": "silent", "result_delay_s": -1},  # all or nothing: the mode stays normal
    [{"mode": "silent"}],
    b"not json",
])
def test_the_control_endpoint_refuses_unknown_settings_and_values(daraja, sim, body):
    res = daraja.call("/_sim/initiator", body, token=False)
    assert res.status == 400
    assert res.json()["error"]["code"] == (
        "invalid_json" if not isinstance(body, dict) else "invalid_initiator")
    assert res.json()["error"]["message"]
    assert sim.sim.initiator()["mode"] == "normal"


@pytest.mark.parametrize("changes, words", [
    ({"mode": "stormy"}, "stormy"),
    ({"result_delay_s": -0.5}, "result_delay_s"),
    ({"single_parameter": "yes"}, "single_parameter"),
])
def test_set_initiator_refuses_a_bad_value_and_changes_nothing(sim, changes, words):
    with pytest.raises(ValueError, match=words):
        sim.sim.set_initiator(**changes)
    assert sim.sim.initiator()["mode"] == "normal" and not sim.sim.initiator()["single_parameter"]


def test_unlock_false_changes_nothing(initiator, daraja, sim, pem):
    for _ in range(sim_initiator.LOCK_AFTER):
        initiator.result("balance", SecurityCredential=wrong(pem))
    res = daraja.call("/_sim/initiator", {"unlock": False}, token=False)
    assert (res.status, res.json()["locked"]) == (200, True)


def test_initiator_requests_are_counted(initiator, sim, pem):
    initiator.result("balance")
    initiator.result("status")
    initiator.result("reversal", SecurityCredential=wrong(pem))
    initiator.call("reversal", Amount=0)  # refused: counted as a request all the same
    stats = settled(sim, initiator_results_sent=3)
    assert {k: stats[k] for k in sim_initiator.COUNTERS} == {
        "reversals": 2, "transaction_status": 1, "account_balance": 1,
        "initiator_results_sent": 3, "initiator_results_failed": 0,
        "initiator_timeouts_sent": 0, "initiator_credential_failures": 1}
    assert len(sim.sim.initiator_results) == 3


# --- the certificate ---------------------------------------------------------------------

def test_the_certificate_is_a_self_signed_rsa_2048_pem(sim, pem):
    res = HTTP.request("GET", sim.url + "/_sim/initiator/certificate")
    assert res.headers["Content-Type"] == "application/x-pem-file"
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    cert = x509.load_pem_x509_certificate(pem)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "apicrypt.safaricom.co.ke-simulator")
    assert cert.public_key().key_size == 2048
    assert sim.sim.initiator_certificate_pem() == pem  # one key for the simulator's life


def test_the_cert_file_setting_writes_the_pem_at_start(tmp_path):
    path = tmp_path / "initiator.cer"
    settings = simulator.SimSettings.from_env({"MPESA_SIM_CERT_FILE": str(path)})
    sim = simulator.Simulator(settings)
    try:
        assert path.read_bytes() == sim.initiator_certificate_pem()
    finally:
        sim.stop()
    other = simulator.Simulator(simulator.SimSettings())
    try:
        assert other.initiator_certificate_pem() != path.read_bytes()  # a key of its own
    finally:
        other.stop()


def test_a_cert_file_that_cannot_be_written_stops_the_simulator(tmp_path):
    with pytest.raises(ValueError, match="MPESA_SIM_CERT_FILE"):
        simulator.Simulator(simulator.SimSettings(cert_file=str(tmp_path / "no" / "cert.pem")))


# --- settings, and running without cryptography -------------------------------------------

def test_initiator_settings_default_and_read_from_the_environment():
    s = simulator.SimSettings.from_env({})
    assert (s.initiator_name, s.initiator_password, s.result_delay_s, s.cert_file) == (
        "testapi", "Safaricom123!!", 1.0, "")
    assert (simulator.SANDBOX_INITIATOR_NAME, simulator.SANDBOX_INITIATOR_PASSWORD) == (
        "testapi", "Safaricom123!!")
    s = simulator.SimSettings.from_env({
        "MPESA_SIM_INITIATOR_NAME": "apiop37", "MPESA_SIM_INITIATOR_PASSWORD": "Safaricom999!*!",
        "MPESA_SIM_RESULT_DELAY_S": "0.5", "MPESA_SIM_CERT_FILE": "/tmp/sim.cer"})
    assert (s.initiator_name, s.initiator_password, s.result_delay_s, s.cert_file) == (
        "apiop37", "Safaricom999!*!", 0.5, "/tmp/sim.cer")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_result_delay_is_refused_naming_the_variable(value):
    with pytest.raises(ValueError, match="MPESA_SIM_RESULT_DELAY_S"):
        simulator.SimSettings.from_env({"MPESA_SIM_RESULT_DELAY_S": value})
    with pytest.raises(ValueError, match="result_delay_s"):
        simulator.SimSettings(result_delay_s=-1.0)


def test_the_simulator_makes_no_key_until_one_is_needed():
    code = ("import sys\n"
            "from mpesa_devtools import simulator\n"
            "sim = simulator.Simulator(); sim.stop()\n"
            "print('cryptography' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


def test_without_cryptography_the_initiator_apis_say_how_to_install_it(tmp_path):
    code = """
import base64, json, sys
sys.modules["cryptography"] = None  # import cryptography fails
from webtest import TestApp
from mpesa_devtools import simulator
sim = simulator.Simulator()
app = TestApp(sim)
basic = base64.b64encode(b"demo-consumer-key:demo-consumer-secret").decode()
token = app.get("/oauth/v1/generate?grant_type=client_credentials",
                headers={"Authorization": "Basic " + basic}).json["access_token"]
body = {"Initiator": "testapi", "SecurityCredential": "x", "CommandID": "AccountBalance",
        "PartyA": "600984", "IdentifierType": "4", "ResultURL": "http://127.0.0.1:9/r",
        "QueueTimeOutURL": "http://127.0.0.1:9/t"}
res = app.post_json("/mpesa/accountbalance/v1/query", body,
                    headers={"Authorization": "Bearer " + token}, status=500)
cert = app.get("/_sim/initiator/certificate", status=500)
other = simulator.Simulator(simulator.SimSettings(cert_file=sys.argv[1]))  # starts all the same
other.stop()
print(json.dumps([res.json["errorCode"], res.json["errorMessage"],
                  cert.json["error"]["code"]]))
sim.stop()
"""
    path = tmp_path / "never-written.pem"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT_DIR,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    code, message, cert_code = json.loads(proc.stdout)
    assert (code, cert_code) == ("500.003.1001", "cryptography_missing")
    assert "pip install cryptography" in message
    assert not path.exists()
    assert "MPESA_SIM_CERT_FILE not written" in proc.stderr  # a warning, on stderr
