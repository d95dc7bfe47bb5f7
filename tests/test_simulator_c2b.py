"""The simulator's Paybill and Till (C2B) APIs and Dynamic QR, over a real loopback socket.

Each test talks HTTP to 127.0.0.1 only, as a merchant's code talks to Daraja: a token,
Register URL (v1 or v2), Simulate, Dynamic QR.  The merchant's ValidationURL and
ConfirmationURL are a small WSGI app served the same way, recording every POST and
answering as the test scripts it (accept, refuse, never answer in time, fail).
"""

import base64
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
import urllib3

from helpers import PAYBILL, ROOT_DIR, free_port, png_pixels, serve, wait_for
from helpers import SimulatorApi as Daraja
from mpesa_devtools import simulator

TILL = "600985"
PHONE = "254712345678"  # no scenario
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=15.0))
RECEIPT = re.compile(r"[A-Z][A-L][1-9A-V][A-Z0-9]{7}")
FIELDS = ("TransactionType", "TransID", "TransTime", "TransAmount", "BusinessShortCode",
          "BillRefNumber", "InvoiceNumber", "OrgAccountBalance", "ThirdPartyTransID", "MSISDN",
          "FirstName", "MiddleName", "LastName")
VALIDATION_ON = {"c2b_validation": True, "c2b_validation_timeout_s": 0.5}


class Merchant:
    """The merchant's ValidationURL and ConfirmationURL: records each POST, answers as told.

    `validation_answer` is the JSON answered to a validation, or "hang": no answer until the
    test ends (the simulator's timeout is short).  `confirmation_status` is the status the
    confirmation gets."""

    def __init__(self):
        self._lock = threading.Lock()
        self.validations, self.confirmations = [], []
        self.validation_answer = {"ResultCode": "0", "ResultDesc": "Accepted"}
        self.confirmation_status = "200 OK"
        self.released = threading.Event()
        self.url = None

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        path = environ.get("PATH_INFO", "")
        if path == "/c2b/validate":
            with self._lock:
                self.validations.append(body)
            if self.validation_answer == "hang":
                self.released.wait(20)
            status, answer = "200 OK", self.validation_answer
        else:
            with self._lock:
                self.confirmations.append(body)
            status, answer = self.confirmation_status, {"ResultCode": 0, "ResultDesc": "Success"}
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    @property
    def urls(self):
        return {"confirmation": self.url + "/c2b/confirm", "validation": self.url + "/c2b/validate"}

    def wait_confirmations(self, n, timeout=8.0):
        wait_for(lambda: len(self.confirmations) >= n, timeout=timeout)
        return [json.loads(b) for b in self.confirmations[:n]]


@pytest.fixture
def daraja(sim):
    return Daraja(sim.url)


@pytest.fixture
def merchant():
    app = Merchant()
    server, url = serve(app)
    app.url = url
    yield app
    app.released.set()
    server.shutdown()


def error(res):
    body = res.json()
    assert body["requestId"]
    return res.status, body["errorCode"], body["errorMessage"]


def settled(sim, **expected):
    """Wait until the simulator's counters show `expected`; return them."""
    return wait_for(lambda: (s := sim.stats()) and all(s[k] == v for k, v in expected.items())
                    and s, timeout=8.0)


# --- Register URL ---------------------------------------------------------------------

@pytest.mark.parametrize("version, code, description", [
    ("v1", "0", "success"),
    ("v2", "00000000", "Success"),
])
def test_register_url_answers_as_its_version_and_stores_the_urls(daraja, sim, version, code,
                                                                  description):
    res = daraja.register(version=version, response_type="Cancelled",
                          confirmation="https://pay.example.com/c2b/confirm",
                          validation="http://127.0.0.1:9/c2b/validate")
    assert res.status == 200
    answer = res.json()
    assert set(answer) == {"OriginatorCoversationID", "ResponseCode", "ResponseDescription"}
    assert answer["OriginatorCoversationID"]  # Daraja's spelling, kept
    assert (answer["ResponseCode"], answer["ResponseDescription"]) == (code, description)
    assert sim.sim.registered_urls(PAYBILL) == {
        "ResponseType": "Cancelled", "ConfirmationURL": "https://pay.example.com/c2b/confirm",
        "ValidationURL": "http://127.0.0.1:9/c2b/validate", "version": version}
    assert sim.stats()["c2b_registrations"] == 1


def test_re_registering_replaces_freely_and_a_numeric_shortcode_is_accepted(daraja, sim):
    assert daraja.register(shortcode=int(PAYBILL)).status == 200
    assert daraja.register(version="v2", confirmation="http://127.0.0.1:9/second").status == 200
    urls = sim.sim.registered_urls(PAYBILL)
    assert (urls["ConfirmationURL"], urls["version"]) == ("http://127.0.0.1:9/second", "v2")
    assert sim.sim.registered_urls(TILL) is None
    assert sim.stats()["c2b_registrations"] == 2


@pytest.mark.parametrize("shortcode", ["174379", 174379])  # the sandbox's STK shortcode
def test_the_stk_only_shortcode_cannot_register_urls(daraja, sim, shortcode):
    res = daraja.register(shortcode=shortcode)
    status, code, message = error(res)
    assert (status, code) == (500, "500.003.1001")
    assert "Execution of ServiceCallout SCO-AddURLVault failed" in message
    assert "ResponseCode 409" in message
    assert sim.sim.registered_urls(simulator.SANDBOX_SHORTCODE) is None
    assert sim.stats()["c2b_registrations"] == 0


@pytest.mark.parametrize("word", ["m-pesa", "mpesa", "safaricom", "exe", "exec", "cmd", "sql",
                                  "query"])
@pytest.mark.parametrize("where", ["path", "host"])
def test_a_forbidden_word_anywhere_in_a_url_refuses_the_registration(daraja, sim, word, where):
    if where == "path":  # any case
        url = f"http://127.0.0.1:9/pay/{word.upper()}/{word.capitalize()}"
    else:
        url = f"https://pay{word}.example.com/c2b"
    for name, changes in (("ConfirmationURL", {"confirmation": url}),
                          ("ValidationURL", {"validation": url})):
        res = daraja.register(**changes)
        assert error(res) == (400, "400.002.02", f"Bad Request - Invalid {name}")
    assert sim.sim.registered_urls(PAYBILL) is None


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/c2b",
    "/c2b/confirm",
    "127.0.0.1:9/c2b",
    "http://127.0.0.1:9/c2b confirm",
    "http:///c2b",
    42,
])
def test_a_url_that_is_not_absolute_http_is_refused(daraja, url):
    assert error(daraja.register(confirmation=url)) == (
        400, "400.002.02", "Bad Request - Invalid ConfirmationURL")


@pytest.mark.parametrize("response_type", ["Canceled", "completed", "COMPLETED", " Completed",
                                           "Complete", 0])
def test_response_type_must_be_spelled_exactly(daraja, sim, response_type):
    assert error(daraja.register(response_type=response_type)) == (
        400, "400.002.02", "Bad Request - Invalid ResponseType")
    assert sim.sim.registered_urls(PAYBILL) is None


@pytest.mark.parametrize("shortcode", ["1234", "12345678", "60098A", 12.5, True])
def test_register_refuses_a_shortcode_that_is_not_5_to_7_digits(daraja, shortcode):
    assert error(daraja.register(shortcode=shortcode)) == (
        400, "400.002.02", "Bad Request - Invalid ShortCode")


@pytest.mark.parametrize("missing", ["ShortCode", "ResponseType", "ConfirmationURL",
                                     "ValidationURL"])
def test_register_without_a_field_is_a_bare_bad_request(daraja, missing):
    body = {"ShortCode": PAYBILL, "ResponseType": "Completed",
            "ConfirmationURL": "http://127.0.0.1:9/c", "ValidationURL": "http://127.0.0.1:9/v"}
    del body[missing]
    assert error(daraja.call("/mpesa/c2b/v2/registerurl", body)) == (
        400, "400.003.02", "Bad Request")


@pytest.mark.parametrize("path", ["/mpesa/c2b/v1/registerurl", "/mpesa/c2b/v2/simulate"])
def test_c2b_needs_a_live_token(daraja, sim, path):
    for token in (False, "not-a-token"):
        res = daraja.call(path, {"ShortCode": PAYBILL}, token=token)
        assert error(res) == (400, "400.003.01", "Invalid Access Token")
    stats = sim.stats()
    assert (stats["c2b_registrations"], stats["c2b_simulations"]) == (0, 0)


def test_c2b_answers_to_the_push_weather(daraja, sim, merchant):
    daraja.token()
    sim.sim.set_weather(push="maintenance")
    assert error(daraja.register(**merchant.urls))[:2] == (500, "500.002.1001")
    assert sim.sim.registered_urls(PAYBILL) is None
    # `internal`: processed, only the answer is lost
    sim.sim.set_weather(push="internal")
    assert error(daraja.register(**merchant.urls)) == (500, "500.003.1001",
                                                       "Internal Server Error")
    assert sim.sim.registered_urls(PAYBILL)["ConfirmationURL"] == merchant.urls["confirmation"]
    assert error(daraja.simulate())[:2] == (500, "500.003.1001")
    assert len(merchant.wait_confirmations(1)) == 1


# --- Simulate and the confirmation -----------------------------------------------------

def test_paybill_v1_confirmation_is_all_strings_with_the_msisdn_hashed(daraja, sim, merchant):
    assert daraja.register(version="v1", **merchant.urls).status == 200
    before = datetime.now(simulator.EAT).strftime("%Y%m%d%H%M%S")
    answer = daraja.paid(amount="25", bill_ref="INV-17")
    assert answer["ResponseCode"] == "0"
    assert answer["ResponseDescription"] == "Accept the service request successfully."
    assert answer["OriginatorCoversationID"]
    (body,) = merchant.wait_confirmations(1)
    after = datetime.now(simulator.EAT).strftime("%Y%m%d%H%M%S")
    assert list(body) == list(FIELDS)
    assert all(type(value) is str for value in body.values()), body
    assert RECEIPT.fullmatch(body["TransID"])
    assert before <= body["TransTime"] <= after  # EAT, YYYYMMDDHHmmss
    assert body["MSISDN"] == hashlib.sha256(PHONE.encode()).hexdigest()
    assert {k: v for k, v in body.items() if k not in ("TransID", "TransTime", "MSISDN")} == {
        "TransactionType": "Pay Bill", "TransAmount": "25.00", "BusinessShortCode": PAYBILL,
        "BillRefNumber": "INV-17", "InvoiceNumber": "", "OrgAccountBalance": "25.00",
        "ThirdPartyTransID": "", "FirstName": "JOHN", "MiddleName": "", "LastName": ""}
    assert merchant.validations == []  # validation is off by default
    # The simulator keeps what it sent, byte for byte.
    stats = settled(sim, c2b_confirmations_sent=1)
    assert sim.sim.c2b_confirmations == [(merchant.urls["confirmation"],
                                          merchant.confirmations[0])]
    assert (stats["c2b_simulations"], stats["c2b_validations_sent"]) == (1, 0)


@pytest.mark.parametrize("bill_ref", [None, "", "IGNORED"])
def test_till_v2_confirmation_has_no_account_and_a_masked_msisdn(daraja, merchant, bill_ref):
    assert daraja.register(shortcode=TILL, version="v2", **merchant.urls).status == 200
    daraja.paid(shortcode=int(TILL), command="CustomerBuyGoodsOnline", msisdn=int(PHONE),
                bill_ref=bill_ref, amount=7, version="v2")
    (body,) = merchant.wait_confirmations(1)
    assert all(type(value) is str for value in body.values()), body
    assert body["TransactionType"] == "Buy Goods"
    assert body["BusinessShortCode"] == TILL
    assert body["BillRefNumber"] == ""
    assert body["TransAmount"] == "7.00"
    assert body["MSISDN"] == "2547 ***** 678"
    assert re.fullmatch(r"[0-9]{4} \*{5} [0-9]{3}", body["MSISDN"])


def test_each_payment_has_its_own_receipt_and_raises_the_balance(daraja, merchant):
    daraja.register(**merchant.urls)
    daraja.paid(amount=10)
    merchant.wait_confirmations(1)
    daraja.paid(amount=5)
    first, second = merchant.wait_confirmations(2)
    assert first["TransID"] != second["TransID"]
    assert (first["OrgAccountBalance"], second["OrgAccountBalance"]) == ("10.00", "15.00")


def test_c2btwice_sends_the_same_confirmation_twice(daraja, sim, merchant):
    daraja.register(**merchant.urls)
    daraja.paid(bill_ref=simulator.C2B_TWICE)
    first, second = merchant.wait_confirmations(2)
    assert merchant.confirmations[0] == merchant.confirmations[1]
    assert first["TransID"] == second["TransID"]
    assert first["BillRefNumber"] == "C2BTWICE"
    settled(sim, c2b_confirmations_sent=2, c2b_simulations=1)


def test_an_unregistered_shortcode_pays_silently(daraja, sim, merchant):
    daraja.register(shortcode=PAYBILL, **merchant.urls)
    assert daraja.paid(shortcode=TILL, command="CustomerBuyGoodsOnline")["ResponseCode"] == "0"
    daraja.paid(shortcode=PAYBILL, bill_ref="SECOND")  # sent after the first would have been
    (body,) = merchant.wait_confirmations(1)
    assert body["BillRefNumber"] == "SECOND"
    stats = settled(sim, c2b_confirmations_sent=1)
    assert (stats["c2b_simulations"], stats["c2b_unregistered"]) == (2, 1)
    assert len(merchant.confirmations) == 1 and merchant.validations == []


def test_a_failed_confirmation_is_counted_and_never_resent(daraja, sim, merchant):
    merchant.confirmation_status = "500 Internal Server Error"
    daraja.register(**merchant.urls)
    daraja.paid()
    stats = settled(sim, c2b_confirmations_failed=1)
    assert stats["c2b_confirmations_sent"] == 0
    merchant.confirmation_status = "200 OK"
    daraja.paid(bill_ref="NEXT")  # the next payment's confirmation comes after any resend
    bodies = merchant.wait_confirmations(2)
    settled(sim, c2b_confirmations_sent=1)
    assert [b["BillRefNumber"] for b in bodies] == ["INV-17", "NEXT"]
    assert len(merchant.confirmations) == 2
    assert [json.loads(b)["BillRefNumber"] for _, b in sim.sim.c2b_confirmations] == ["NEXT"]


@pytest.mark.parametrize("changes, field_name", [
    ({"shortcode": "1234"}, "ShortCode"),
    ({"command": "CustomerPayBill"}, "CommandID"),
    ({"command": "BusinessPayBill"}, "CommandID"),
    ({"amount": 0}, "Amount"),
    ({"amount": 10.5}, "Amount"),
    ({"amount": "10.00"}, "Amount"),
    ({"amount": 250_001}, "Amount"),
    ({"msisdn": "0712345678"}, "Msisdn"),
    ({"msisdn": "+254712345678"}, "Msisdn"),
    ({"bill_ref": ["INV"]}, "BillRefNumber"),
])
def test_simulate_refuses_an_invalid_field(daraja, sim, changes, field_name):
    assert error(daraja.simulate(**changes)) == (
        400, "400.002.02", f"Bad Request - Invalid {field_name}")
    assert sim.stats()["c2b_simulations"] == 0


@pytest.mark.parametrize("missing", ["shortcode", "command", "amount", "msisdn", "bill_ref"])
def test_simulate_without_a_field_is_a_bare_bad_request(daraja, missing):
    # BillRefNumber is required for a paybill (a till ignores it)
    assert error(daraja.simulate(**{missing: None})) == (400, "400.003.02", "Bad Request")


# --- Validation ----------------------------------------------------------------------

@pytest.mark.parametrize("sim_settings", [VALIDATION_ON], indirect=True)
@pytest.mark.parametrize("result_code", ["0", 0])
def test_an_accepted_validation_is_followed_by_the_confirmation(daraja, sim, merchant,
                                                                result_code):
    merchant.validation_answer = {"ResultCode": result_code, "ResultDesc": "Accepted",
                                  "ThirdPartyTransID": "ORDER-9"}
    daraja.register(version="v2", **merchant.urls)
    daraja.paid()
    (confirmation,) = merchant.wait_confirmations(1)
    (validation,) = [json.loads(b) for b in merchant.validations]
    assert list(validation) == list(FIELDS)
    assert all(type(value) is str for value in validation.values())
    assert validation["OrgAccountBalance"] == "" and validation["ThirdPartyTransID"] == ""
    assert confirmation["ThirdPartyTransID"] == "ORDER-9"
    assert confirmation["OrgAccountBalance"] == "10.00"
    assert {k: v for k, v in validation.items() if k not in (
        "OrgAccountBalance", "ThirdPartyTransID")} == {
        k: v for k, v in confirmation.items() if k not in (
            "OrgAccountBalance", "ThirdPartyTransID")}  # same TransID, time, MSISDN…
    stats = settled(sim, c2b_confirmations_sent=1)
    assert (stats["c2b_validations_sent"], stats["c2b_validations_rejected"]) == (1, 0)


@pytest.mark.parametrize("sim_settings", [VALIDATION_ON], indirect=True)
def test_a_refused_validation_stops_the_payment(daraja, sim, merchant):
    merchant.validation_answer = {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
    daraja.register(**merchant.urls)
    daraja.paid(bill_ref="NO-SUCH-ACC")
    stats = settled(sim, c2b_validations_rejected=1)
    (validation,) = [json.loads(b) for b in merchant.validations]
    assert sim.sim.c2b_rejections == [(validation["TransID"], "C2B00012")]
    # The next payment is validated and confirmed; the refused one never is.
    merchant.validation_answer = {"ResultCode": "0", "ResultDesc": "Accepted"}
    daraja.paid(bill_ref="GOOD")
    (body,) = merchant.wait_confirmations(1)
    assert body["BillRefNumber"] == "GOOD"
    stats = settled(sim, c2b_confirmations_sent=1)
    assert (stats["c2b_validations_sent"], stats["c2b_confirmations_failed"]) == (2, 0)
    assert len(merchant.confirmations) == 1


@pytest.mark.parametrize("sim_settings", [VALIDATION_ON], indirect=True)
@pytest.mark.parametrize("response_type, confirmed", [("Completed", 1), ("Cancelled", 0)])
def test_an_unanswered_validation_lets_the_response_type_decide(daraja, sim, merchant,
                                                                response_type, confirmed):
    merchant.validation_answer = "hang"
    daraja.register(response_type=response_type, **merchant.urls)
    started = time.monotonic()
    daraja.paid()
    stats = settled(sim, c2b_validations_unanswered=1, c2b_cancelled=1 - confirmed,
                    c2b_confirmations_sent=confirmed)
    assert time.monotonic() - started >= 0.5  # the timeout was waited out
    assert len(merchant.validations) == 1
    assert stats["c2b_validations_rejected"] == 0
    if confirmed:
        (body,) = merchant.wait_confirmations(1)
        assert body["ThirdPartyTransID"] == ""
    else:
        daraja.register(shortcode=TILL, **merchant.urls)  # a later payment shows none came
        merchant.validation_answer = {"ResultCode": "0", "ResultDesc": "Accepted"}
        daraja.paid(shortcode=TILL, command="CustomerBuyGoodsOnline")
        (body,) = merchant.wait_confirmations(1)
        assert body["BusinessShortCode"] == TILL


@pytest.mark.parametrize("sim_settings", [VALIDATION_ON], indirect=True)
def test_an_unreachable_validation_url_completes_under_completed(daraja, sim, merchant):
    daraja.register(response_type="Completed", confirmation=merchant.urls["confirmation"],
                    validation=f"http://127.0.0.1:{free_port()}/c2b/validate")
    daraja.paid()
    merchant.wait_confirmations(1)
    settled(sim, c2b_validations_sent=1, c2b_validations_unanswered=1, c2b_confirmations_sent=1)


# --- Dynamic QR ----------------------------------------------------------------------

QR_REQUEST = {"MerchantName": "TEST SUPERMARKET", "RefNo": "Invoice Test", "Amount": 1,
              "TrxCode": "BG", "CPI": "373132", "Size": "300"}


def test_dynamic_qr_is_a_png_that_decodes_to_its_text(daraja, sim):
    zxingcpp = pytest.importorskip("zxingcpp", reason="the QR reader zxing-cpp is not installed")
    res = daraja.call("/mpesa/qrcode/v1/generate", QR_REQUEST)
    assert res.status == 200, res.data
    answer = res.json()
    assert (answer["ResponseCode"], answer["ResponseDescription"]) == (
        "00", "QR Code Successfully Generated.")
    assert answer["RequestID"]
    width, height, grey = png_pixels(base64.b64decode(answer["QRCode"], validate=True))
    assert width == height and 250 <= width <= 350  # Size "300", roughly
    (found,) = zxingcpp.read_barcodes(memoryview(grey).cast("B", (height, width)))
    assert found.format == zxingcpp.BarcodeFormat.QRCode
    assert json.loads(found.text) == {"MerchantName": "TEST SUPERMARKET", "RefNo": "Invoice Test",
                                      "Amount": 1, "TrxCode": "BG", "CPI": "373132"}
    assert found.text == ('{"MerchantName":"TEST SUPERMARKET","RefNo":"Invoice Test",'
                          '"Amount":1,"TrxCode":"BG","CPI":"373132"}')
    assert sim.stats()["qr_codes"] == 1


def test_dynamic_qr_png_holds_segnos_matrix(daraja):
    """Without a reader: each module of the code segno makes for the documented text is a
    square of the PNG, black where the matrix says dark."""
    segno = pytest.importorskip("segno")
    answer = daraja.call("/mpesa/qrcode/v1/generate", dict(QR_REQUEST, TrxCode="PB",
                                                           Size=150)).json()
    width, _, grey = png_pixels(base64.b64decode(answer["QRCode"]))
    text = ('{"MerchantName":"TEST SUPERMARKET","RefNo":"Invoice Test","Amount":1,'
            '"TrxCode":"PB","CPI":"373132"}')
    matrix = [list(row) for row in segno.make_qr(text, error="m").matrix_iter(border=4)]
    scale = width // len(matrix)
    assert scale * len(matrix) == width and scale >= 2
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            centre = (y * scale + scale // 2) * width + x * scale + scale // 2
            assert grey[centre] == (0 if dark else 255), (x, y)


@pytest.mark.parametrize("size, low, high", [("600", 550, 650), (None, 250, 350), ("1", 1, 60)])
def test_dynamic_qr_size_scales_the_png(daraja, size, low, high):
    body = {k: v for k, v in dict(QR_REQUEST, Size=size).items() if v is not None}
    answer = daraja.call("/mpesa/qrcode/v1/generate", body).json()
    width, height, _ = png_pixels(base64.b64decode(answer["QRCode"]))
    assert width == height and low <= width <= high


@pytest.mark.parametrize("changes, field_name", [
    ({"TrxCode": "XX"}, "TrxCode"),
    ({"TrxCode": "bg"}, "TrxCode"),
    ({"Amount": 1.5}, "Amount"),
    ({"Amount": 0}, "Amount"),
    ({"CPI": "12"}, "CPI"),
    ({"MerchantName": ""}, "MerchantName"),
    ({"RefNo": None}, "RefNo"),
    ({"Size": "big"}, "Size"),
    ({"Size": "0"}, "Size"),
])
def test_dynamic_qr_refuses_an_invalid_field(daraja, sim, changes, field_name):
    body = {k: v for k, v in dict(QR_REQUEST, **changes).items() if v is not None}
    assert error(daraja.call("/mpesa/qrcode/v1/generate", body)) == (
        400, "400.002.02", f"Bad Request - Invalid {field_name}")
    assert sim.stats()["qr_codes"] == 0


def test_dynamic_qr_needs_a_token(daraja):
    res = daraja.call("/mpesa/qrcode/v1/generate", QR_REQUEST, token="expired")
    assert error(res) == (404, "404.001.03", "Invalid Access Token")


def test_dynamic_qr_without_segno_says_how_to_install_it(daraja, monkeypatch):
    daraja.token()
    monkeypatch.setitem(sys.modules, "segno", None)  # import segno fails
    status, code, message = error(daraja.call("/mpesa/qrcode/v1/generate", QR_REQUEST))
    assert (status, code) == (500, "500.003.1001")
    assert "pip install segno" in message


def test_the_simulator_imports_and_serves_without_segno():
    """segno is imported by the QR handler alone: the runtime package does not depend on it."""
    code = ("import sys; sys.modules['segno'] = None\n"
            "from mpesa_devtools import simulator\n"
            "sim = simulator.Simulator(); sim.stop()\n"
            "print('segno' in sys.modules and sys.modules['segno'] is not None)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT_DIR, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, "False"), proc.stderr


# --- settings --------------------------------------------------------------------------

def test_c2b_settings_default_and_read_from_the_environment():
    s = simulator.SimSettings.from_env({})
    assert (s.c2b_validation, s.c2b_validation_timeout_s) == (False, 8.0)
    s = simulator.SimSettings.from_env({"MPESA_SIM_C2B_VALIDATION": "on",
                                        "MPESA_SIM_C2B_VALIDATION_TIMEOUT_S": "2.5"})
    assert (s.c2b_validation, s.c2b_validation_timeout_s) == (True, 2.5)


@pytest.mark.parametrize("name, value", [
    ("MPESA_SIM_C2B_VALIDATION", "yes"),
    ("MPESA_SIM_C2B_VALIDATION_TIMEOUT_S", "0"),
    ("MPESA_SIM_C2B_VALIDATION_TIMEOUT_S", "soon"),
])
def test_c2b_settings_refuse_bad_values_naming_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        simulator.SimSettings.from_env({name: value})
    with pytest.raises(ValueError, match="c2b_validation_timeout_s"):
        simulator.SimSettings(c2b_validation_timeout_s=0)
