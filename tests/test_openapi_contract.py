"""The OpenAPI document is honest: schemathesis drives the WSGI app from it.

Every generated request must get no 5xx (other than the documented answers to Daraja's
own refusals, which the simulator's scenario phones make), and every response must match
the document (status code, content type, headers, body schema).

SOAK_EXAMPLES sets the examples per operation (`make soak`: 10,000); the figures
(examples run, 5xx answers) are printed at the end of the run.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import config
import mpesa_wsgi
from helpers import API_KEY, base_env, soak_examples
from mpesa_devtools import simulator

CONFORMANCE = [status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance]
CHECKS = [not_a_server_error, *CONFORMANCE]
# 5xx answers the document promises for Daraja's own refusals (the simulator's scenario
# phones make them, e.g. 254711005002 = spike arrest): answers, not server errors.
UPSTREAM_ANSWERS = {(502, "daraja_rejected"), (503, "upstream_unavailable"),
                    (503, "gateway_busy"), (503, "initiator_stopped"),
                    (503, "initiator_unproven")}


def upstream_answer(response):
    try:
        return (response.status_code, response.json()["error"]["code"]) in UPSTREAM_ANSWERS
    except (ValueError, KeyError, TypeError):
        return False


@pytest.fixture
def sim_settings():
    return simulator.SimSettings(callback_delay_s=60, lock_subscriber=False)


@pytest.fixture
def app(sim, tmp_path):
    cert = tmp_path / "sim.pem"  # the simulator's initiator: refunds and checks really run
    cert.write_bytes(sim.sim.initiator_certificate_pem())
    env = dict(base_env(sim.url, tmp_path / "contract.db"), GATEWAY_RATE="100000",
               GATEWAY_BURST="100000", GATEWAY_PHONE_LOCK_S="0",
               MPESA_INITIATOR_NAME=simulator.SANDBOX_INITIATOR_NAME,
               MPESA_INITIATOR_PASSWORD=simulator.SANDBOX_INITIATOR_PASSWORD,
               MPESA_CERT_FILE=str(cert))
    gateway = mpesa_wsgi.create_app(config.load_config(env))
    yield gateway
    gateway.services.close()


def test_every_response_conforms_and_none_is_a_5xx(app, report_figures):
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6  # schemathesis skips the document's own path
    auth = {"Authorization": f"Bearer {API_KEY}"}
    tally = {"examples": 0, "5xx": 0, "upstream": 0}
    examples = soak_examples(40)

    try:
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
            def conforms(case):
                response = case.call(headers=auth)
                tally["examples"] += 1
                upstream = upstream_answer(response)
                tally["upstream"] += upstream
                tally["5xx"] += response.status_code >= 500 and not upstream
                case.validate_response(response, checks=CONFORMANCE if upstream else CHECKS,
                                       headers=auth)

            conforms()
    finally:
        report_figures(f"openapi contract: operations={len(operations)} "
                       f"max_examples_per_operation={examples} examples_run={tally['examples']} "
                       f"5xx={tally['5xx']} documented_upstream_answers={tally['upstream']}")
    assert tally["5xx"] == 0
