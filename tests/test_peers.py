"""A well-liked SDK agrees with us: mpesakit's C2B client, with only its base URL pointed
at the simulator, registers its URLs there; the confirmation bodies its schemas describe are
read by the gateway, and the simulator's confirmations fit its schemas."""

import json

import pytest

from helpers import PAYBILL, SimulatorApi, wait_for
from mpesa_devtools import simulator

mpesakit = pytest.importorskip("mpesakit", reason="mpesakit is a test requirement")

from mpesakit.auth import TokenManager  # noqa: E402 - after the skip
from mpesakit.c2b import C2B, C2BRegisterUrlRequest, C2BValidationRequest  # noqa: E402
from mpesakit.http_client import MpesaHttpClient  # noqa: E402


def mpesakit_c2b(base_url):
    http = MpesaHttpClient(env="sandbox", trust_env=False)
    http.base_url = base_url  # the one change: the simulator instead of Safaricom
    tokens = TokenManager(consumer_key=simulator.DEMO_CONSUMER_KEY,
                          consumer_secret=simulator.DEMO_CONSUMER_SECRET, http_client=http)
    return C2B(http_client=http, token_manager=tokens)


def test_mpesakit_registers_its_c2b_urls_with_the_simulator(sim):
    answer = mpesakit_c2b(sim.url).register_url(C2BRegisterUrlRequest(
        ShortCode=int(PAYBILL), ResponseType="Completed",
        ConfirmationURL="http://127.0.0.1:9/c2b/confirmation/x",
        ValidationURL="http://127.0.0.1:9/c2b/validation/x"))
    assert str(answer.ResponseCode) == "0" and answer.OriginatorConversationID
    assert sim.sim.registered_urls(PAYBILL)["ConfirmationURL"] == (
        "http://127.0.0.1:9/c2b/confirmation/x")


def test_the_gateway_reads_the_confirmation_mpesakit_s_schema_shows(gateway):
    body = dict(C2BValidationRequest.model_config["json_schema_extra"]["example"],
                BusinessShortCode=int(simulator.SANDBOX_SHORTCODE))  # numbers, as its example
    path = "/" + gateway.services.signer.c2b_url("confirmation").split("/", 3)[3]
    gateway.testapp.post(path, json.dumps(body), content_type="application/json", status=200)
    kept = gateway.services.ledger.c2b_receipt(body["TransID"])
    assert (kept["amount"], kept["account"], kept["shortcode"], kept["msisdn"]) == (
        10, "invoice008", simulator.SANDBOX_SHORTCODE, "2547******567")
    assert kept["anomalies"] == ""


def test_the_simulator_s_confirmations_fit_mpesakit_s_schema(gateway, sim):
    signer = gateway.services.signer
    api = SimulatorApi(sim.url)
    for version in ("v1", "v2"):
        api.register(shortcode=PAYBILL, version=version,
                     confirmation=signer.c2b_url("confirmation"),
                     validation=signer.c2b_url("validation"))
        api.simulate(shortcode=PAYBILL, version=version)
    wait_for(lambda: len(sim.sim.c2b_confirmations) >= 2, timeout=30, interval=0.1)
    for _, raw in sim.sim.c2b_confirmations:
        C2BValidationRequest(**json.loads(raw))  # raises when a field does not fit
