"""The demo's settings: sandbox-like values, the simulator as Daraja, loopback only.

Owns what `python mpesa_wsgi.py --demo` sets before the gateway reads its configuration:
the simulator's public sandbox credentials, a local ledger file, a printed API key, the
demo's own webhook endpoint and its secret, the Paybill shortcode menu payments go to,
the simulator's initiator (refunds and code checks: its name, its password, and its
certificate, which the simulator writes where the gateway reads it), a person's console
key, and the ports
(the gateway's, the simulator's on the next one, the receiver's on the one after).
"""

import importlib.util

import config as settings
from mpesa_devtools import simulator

DEMO_WEBHOOK_SECRET = "whsec_" + "ZGVtby13ZWJob29rLXNpZ25pbmctc2VjcmV0LTAxMjM="  # demo only
C2B_SHORTCODE = "600984"  # the sandbox's C2B test shortcode (174379 cannot register URLs)
C2B_TEST_MSISDN = "254708374149"  # the sandbox's test number for C2B simulations
CONSOLE_PERSON = "you"  # the demo's person at /console


INITIATOR_SETTINGS = ("MPESA_INITIATOR_NAME", "MPESA_SECURITY_CREDENTIAL",
                      "MPESA_INITIATOR_PASSWORD", "MPESA_CERT_FILE")


def demo_environment(environ, port, sim_port, api_key, secret, cert_file, console_key=None):
    """The demo's environment: its defaults, then the caller's variables, then what the
    demo never lets go (the simulator as Daraja, loopback only). `cert_file`: where the
    simulator writes its initiator certificate, which the gateway encrypts the initiator's
    password with (unless the caller set an initiator of their own). `console_key`: the
    demo's person's key to the console (reads every owner), unless the caller set keys."""
    env = {
        "MPESA_CONSUMER_KEY": simulator.DEMO_CONSUMER_KEY,
        "MPESA_CONSUMER_SECRET": simulator.DEMO_CONSUMER_SECRET,
        "MPESA_SHORTCODE": simulator.SANDBOX_SHORTCODE,
        "MPESA_PASSKEY": simulator.SANDBOX_PASSKEY,
        "GATEWAY_DB": "mpesa_demo.db",
        "GATEWAY_API_KEYS": api_key,
        "GATEWAY_SECRET": secret,
        # The demo's own merchant endpoint (GATEWAY_PORT + 2) prints each signed event.
        "GATEWAY_WEBHOOK_URLS": f"default:{receiver_url(port)}",
        "GATEWAY_WEBHOOK_SECRETS": "default:" + DEMO_WEBHOOK_SECRET,
        "GATEWAY_WEBHOOK_ALLOW_PRIVATE": "on",
        # Menu payments to a Paybill: the demo registers its URLs for this shortcode.
        "MPESA_C2B_SHORTCODE": C2B_SHORTCODE,
    }
    if console_key:
        env["GATEWAY_CONSOLE_KEYS"] = f"{CONSOLE_PERSON}@*:{console_key}"
    if not any(environ.get(name) for name in INITIATOR_SETTINGS) and importlib.util.find_spec(
            "cryptography") is not None:  # (without the extra: no refunds, the rest works)
        env.update({"MPESA_INITIATOR_NAME": simulator.SANDBOX_INITIATOR_NAME,
                    "MPESA_INITIATOR_PASSWORD": simulator.SANDBOX_INITIATOR_PASSWORD,
                    "MPESA_CERT_FILE": str(cert_file)})
    env.update({k: v for k, v in environ.items() if v})
    # The demo never talks to Safaricom and never listens beyond loopback.
    env.update({
        "MPESA_ENVIRONMENT": "sandbox",
        "MPESA_BASE_URL": f"http://127.0.0.1:{sim_port}",
        "MPESA_CALLBACK_BASE_URL": f"http://127.0.0.1:{port}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        # The demo's callbacks come from its own simulator, on loopback: an allowed source,
        # so no source_not_allowed warning for each payment.
        "MPESA_CALLBACK_IPS": "127.0.0.1,::1",
        "MPESA_SIM_CERT_FILE": str(cert_file),
    })
    return env


def receiver_url(port):
    """Where the demo's webhook receiver listens: GATEWAY_PORT + 2."""
    return f"http://127.0.0.1:{port + 2}/events"


def demo_port(environ):
    """GATEWAY_PORT (8000), leaving the next two ports for the simulator and the receiver."""
    try:
        port = settings.port(environ.get("GATEWAY_PORT") or "8000")
    except ValueError as exc:
        raise settings.ConfigError([f"GATEWAY_PORT {exc}"]) from None
    if port >= 65534:
        raise settings.ConfigError(["GATEWAY_PORT must leave the next two ports for the"
                                    " simulator and the demo's webhook receiver"])
    return port
