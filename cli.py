"""The command line: serve, demo, check-config, reconcile, deliver, migrate, migrate-ledger,
spool, register-c2b.

Owns `python mpesa_wsgi.py [serve | reconcile [--tx ID [--checkout-request-id C]] |
deliver | migrate | migrate-ledger --from A --to B | spool [--dir D] | register-c2b [--v1]]
[--check-config | --demo]`: logging set up once, CPU
pinning, the graceful waitress serving loop, the demo (simulator, receiver and gateway on
loopback), the one-off commands (each builds only the services it needs, with no
background thread), and start-up errors as one clear message and exit status 2, never a
traceback. `mpesa_wsgi` hands it `create_app`; it never imports `mpesa_wsgi`, so that
module is loaded once. The only importer of `mpesa_devtools`.
"""

import argparse
import logging
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import threading
import time

import config as settings
import mpesa_ledger as store
from mpesa_gateway import initiator, logs, serving
from mpesa_gateway.auth import CallbackSigner
from mpesa_gateway.services import build_services
from mpesa_ledger import move as ledger_move

log = logging.getLogger("mpesa_wsgi")

# What `migrate` reads: it touches only the database, so it needs no Daraja credentials.
LEDGER_SETTINGS = ("GATEWAY_DB", "GATEWAY_DB_WAIT_S", "LOG_LEVEL", "LOG_FORMAT")
SHUTDOWN_POLL_S = 0.2  # how soon the serving loop notices SIGTERM
# Besides client connections: the listener, waitress's wake-up pipe, the ledger's files,
# Daraja sockets beyond the threads, the standard streams.
FILES_BESIDES_CONNECTIONS = 64


class StartupError(Exception):
    """Start-up cannot go on; the message says what to fix (exit status 2)."""


def configure_logging(config):
    logs.configure(config.log_level, config.log_format, config.secret_values())


def build_app(create_app, config):
    """create_app, with a ledger that cannot be opened reported as one message."""
    try:
        return create_app(config)
    except store.LedgerOpenError as exc:
        raise StartupError(str(exc)) from None


def command_services(config):
    """The services a one-off command runs over: no reconciler, no webhook sender thread."""
    try:
        return build_services(config, background=False)
    except store.LedgerOpenError as exc:
        raise StartupError(str(exc)) from None


def migrate(config):
    """Create or upgrade the ledger's schema by hand (serving does it at startup too)."""
    try:
        ledger = store.open_ledger(config.db_path, migrate=False, wait_s=config.db_wait_s)
    except store.LedgerOpenError as exc:
        raise StartupError(str(exc)) from None
    try:
        version = ledger.migrate()
    except store.LedgerOpenError as exc:  # e.g. the role may not change the tables
        raise StartupError(str(exc)) from None
    finally:
        ledger.close()
    print(f"ledger {settings.masked_url(config.db_path)} schema_version={version}", flush=True)
    return 0


def pin_cpu(setting):
    """GATEWAY_CPU_AFFINITY: on a multi-core host an unpinned waitress loses 3-4x to GIL
    hand-offs between cores (SPEC §3). Linux only; a no-op where the OS lacks it."""
    if setting is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[os.getpid() % len(cpus)] if setting == "auto" else setting
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        raise StartupError(f"GATEWAY_CPU_AFFINITY={cpu} is not a CPU this process may use"
                           f" (allowed: {','.join(map(str, cpus))})") from None
    return cpu


def waitress_settings(config):
    """The waitress knobs that bound what one client can take (docs/deploying.md)."""
    return dict(
        threads=config.threads,
        # A body over the limit is refused from its Content-Length, before waitress spools
        # it to a temporary file (its default allows 1 GiB).
        max_request_body_size=config.max_body,
        # Idle or half-sent connections: how many are kept, and how long.
        connection_limit=config.connection_limit,
        channel_timeout=config.channel_timeout,
        cleanup_interval=min(30, config.channel_timeout),
        # poll() has no 1024-descriptor ceiling; select() is all Windows has.
        asyncore_use_poll=hasattr(select, "poll"),
        # The app alone decides which X-Forwarded-For hop to believe (GATEWAY_TRUSTED_PROXY);
        # waitress's default would strip the header before the callback policy could see it.
        clear_untrusted_proxy_headers=False,
    )


def check_open_files(config):
    """Refuse to start when the connection limit cannot fit the open-file limit (POSIX):
    at the limit, accept() would fail in a loop and the ledger could open nothing."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = config.connection_limit + 2 * config.threads + FILES_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise StartupError(f"GATEWAY_CONNECTION_LIMIT={config.connection_limit} with"
                           f" GATEWAY_THREADS={config.threads} needs about {needed} open files;"
                           f" this process may open {soft} (raise it with ulimit -n or"
                           " LimitNOFILE=, or lower the limit)")


def create_server(app, host, port, config):
    import waitress  # serving only: importing the app needs no server

    check_open_files(config)
    try:
        server = waitress.create_server(app, host=host, port=port, **waitress_settings(config))
    except (OSError, ValueError) as exc:  # ValueError: waitress found no such host
        reason = getattr(exc, "strerror", None) or exc
        raise StartupError(f"cannot listen on {host}:{port} (GATEWAY_HOST, GATEWAY_PORT):"
                           f" {reason}") from None
    return serving.bound_requests(server, config.request_read_timeout)


def serve(services, server, banner=None):
    """Serve until SIGTERM or Ctrl-C, then shut down in order: stop accepting; let in-flight
    requests finish and their answers flush, and the reconciler's current query end (each
    bounded by the call policies); the caller then closes the app (ledger, pool)."""
    stopping = threading.Event()

    def on_sigterm(*_):
        # Only flags: a handler runs between select() retries, so it must not close sockets.
        server.accepting = False
        stopping.set()

    if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # guarded: not on every OS
    print(banner or f"mpesa-wsgi {settings.VERSION} serving on"
          f" http://{server.effective_host}:{server.effective_port}", flush=True)
    try:
        while not stopping.is_set():  # waitress's own run(), one short poll at a time
            server.asyncore.loop(timeout=SHUTDOWN_POLL_S, map=server._map,
                                 use_poll=server.adj.asyncore_use_poll, count=1)
    except KeyboardInterrupt:
        pass
    server.accepting = False
    if threading.current_thread() is threading.main_thread():
        # A second Ctrl-C must not abandon the pushes still at Daraja: they are drained
        # (bounded by the call policy) whatever else arrives.
        signal.signal(signal.SIGINT, lambda *_: log.warning(
            "shutdown already under way: finishing in-flight requests first"))
    server.del_channel()  # stop listening: new connections are refused from here on
    server.socket.close()
    log.info("shutdown started: no new connections; finishing in-flight requests")
    if services.reconciler is not None:
        services.reconciler.request_stop()  # it finishes its current query meanwhile
    deadline = time.monotonic() + services.daraja.longest_push_s
    dispatcher = server.task_dispatcher
    while time.monotonic() < deadline and (
            dispatcher.active_count or dispatcher.queue
            or any(ch.total_outbufs_len for ch in list(server.active_channels.values()))):
        server.asyncore.loop(timeout=0.05, map=server._map, count=1)
    services.close_background()  # joins the reconciler, bounded by its longest query
    dispatcher.shutdown(timeout=1)
    server.close()
    log.info("shutdown complete")


def run_demo(create_app, environ):
    """The gateway against the simulator on loopback, the demo's receiver printing each
    signed event, until Ctrl-C."""
    from mpesa_devtools import demo

    port = demo.demo_port(environ)  # the simulator takes the next port, the receiver the next
    api_key = environ.get("GATEWAY_API_KEYS") or "demo_" + secrets.token_urlsafe(18)
    folder = tempfile.mkdtemp(prefix="mpesa-demo-")
    console_key = (None if environ.get("GATEWAY_CONSOLE_KEYS")
                   else "console_" + secrets.token_urlsafe(18))
    env = demo.demo_environment(environ, port, port + 1, api_key, secrets.token_urlsafe(24),
                                os.path.join(folder, "simulator-initiator.pem"), console_key)
    # First: the simulator writes the certificate the initiator's credential is made with.
    sim = start_simulator(env, port + 1)
    try:
        config = settings.load_config(env)
        configure_logging(config)
        receiver = None
        if config.webhook_urls == (("default", demo.receiver_url(port)),):
            start_receiver(dict(config.webhook_secrets)["default"], port + 2)
            receiver = demo.receiver_url(port)
        app = build_app(create_app, config)
        try:
            server = create_server(app, "127.0.0.1", port, config)
            shown_key = (api_key if "GATEWAY_API_KEYS" not in environ
                         else "<a key from GATEWAY_API_KEYS>")
            register_demo_c2b(app.services, config)
            pay_link = demo_payment_link(app.services, config)
            serve(app.services, server, demo_banner(config, port, shown_key, receiver,
                                                    console_key, pay_link))
        finally:
            app.services.close()
    finally:
        sim.stop()
        shutil.rmtree(folder, ignore_errors=True)


def register_demo_c2b(services, config):
    """The demo's Paybill URLs, registered with its own simulator (as `register-c2b` does
    with Daraja), so a menu payment reaches the gateway with no extra settings."""
    from mpesa_gateway import daraja

    urls = c2b_urls(config)
    try:
        services.daraja.register_c2b(
            shortcode=config.c2b_shortcode, response_type=config.c2b_response_type,
            confirmation_url=urls["confirmation"], validation_url=urls["validation"])
    except daraja.DarajaError as exc:
        log.warning("demo c2b urls not registered: %s",
                    c2b_refusal(exc, config.c2b_shortcode))


def start_simulator(env, sim_port):
    """The Daraja simulator on 127.0.0.1:`sim_port`, in a thread; returns it (to stop)."""
    import waitress

    from mpesa_devtools import simulator

    try:
        sim = simulator.Simulator(simulator.SimSettings.from_env(env))
    except ValueError as exc:  # a malformed MPESA_SIM_* value
        raise StartupError(f"simulator settings: {exc}") from None
    try:
        server = waitress.create_server(sim, host="127.0.0.1", port=sim_port, threads=4)
    except OSError as exc:
        sim.stop()
        raise StartupError(f"cannot listen on 127.0.0.1:{sim_port} for the simulator"
                           f" (GATEWAY_PORT + 1): {exc.strerror or exc}") from None
    threading.Thread(target=server.run, name="simulator", daemon=True).start()
    return sim


def start_receiver(secret, receiver_port):
    """The demo's webhook receiver on 127.0.0.1:`receiver_port`, in a thread."""
    import waitress

    from mpesa_devtools import receiver

    try:
        server = waitress.create_server(receiver.DemoReceiver(secret, sys.stdout),
                                        host="127.0.0.1", port=receiver_port, threads=2)
    except OSError as exc:
        raise StartupError(f"cannot listen on 127.0.0.1:{receiver_port} for the demo's webhook"
                           f" receiver (GATEWAY_PORT + 2): {exc.strerror or exc}") from None
    threading.Thread(target=server.run, name="webhook-receiver", daemon=True).start()


def demo_payment_link(services, config):
    """A payment link of the demo's (KES 10, 5 uses, a day), for its banner; None if the
    ledger would not make one."""
    from mpesa_gateway import links

    owner = config.api_keys[0][0]
    try:
        row = services.ledger.create_link(
            links.new_link_id(), owner=owner, amount=10, reference="DEMO-LINK",
            description="Demo payment", max_uses=5,
            expires_at=services.clock.wall() + 86_400)
    except services.ledger.Error:
        return None
    return f"{config.callback_base_url}/pay/{row['id']}"


def demo_banner(config, port, shown_key, receiver, console_key=None, pay_link=None):
    """What the demo prints once it serves: where each part listens, the keys, what to
    try."""
    base = f"http://127.0.0.1:{port}"
    console_line = (f"Console (for people, in a browser): {base}/console, console key:"
                    f" {console_key}" if console_key else
                    f"Console: {base}/console, with a key of GATEWAY_CONSOLE_KEYS"
                    if config.console_keys else "Console: off (GATEWAY_CONSOLE_KEYS)")
    events = (f"Webhook receiver: {receiver} (the demo's merchant endpoint; it verifies and"
              " prints each signed event)" if receiver else
              "Webhook events go to GATEWAY_WEBHOOK_URLS (the demo's receiver is off)")
    return "\n".join([
        f"mpesa-wsgi {settings.VERSION} demo: gateway {base}, Daraja simulator"
        f" http://127.0.0.1:{port + 1}, ledger {settings.masked_url(config.db_path)}",
        events,
        f"API key: {shown_key}",
        console_line,
        *([f"Payment link (a customer's pay page: open it, pay with any number): {pay_link}"]
          if pay_link else []),
        "",
        "Start a payment (any Safaricom-style number succeeds; the scenario phones"
        " 254711001032, 254711009999 and 254711000408 are cancelled, lose their callback"
        " and answer late; docs/simulator.md in the source repository lists them all):",
        f"  curl -s -X POST {base}/stkpush -H 'Authorization: Bearer {shown_key}'"
        " -H 'Content-Type: application/json'"
        " -d '{\"phone\":\"0712345678\",\"amount\":10,\"reference\":\"INV001\"}'",
        "Then, with the id it returns (pending, then succeeded after the callback; the"
        " signed webhook event is printed here as it arrives):",
        f"  curl -s {base}/transactions/<id> -H 'Authorization: Bearer {shown_key}'",
        *refund_lines(config, base, shown_key),
        *menu_payment_lines(config, port + 1),
        f"  curl -s {base}/health",
        "Ctrl-C stops the demo.",
    ])


def refund_lines(config, base, shown_key):
    """The banner's curl lines that refund the payment and check a code (when an initiator
    is set: the demo's is the simulator's)."""
    if not config.initiator_name:
        return []
    auth = f"-H 'Authorization: Bearer {shown_key}'"
    return [
        "Refund it (the whole amount, by Daraja's Reversal: GET the payment again to see"
        " refund.status turn refunded), and check an M-Pesa code a customer quotes:",
        f"  curl -s -X POST {base}/transactions/<id>/refund {auth}"
        " -H 'Idempotency-Key: refund-<id>'",
        f"  curl -s -X POST {base}/receipts/<receipt>/verify {auth}",
    ]


def menu_payment_lines(config, sim_port):
    """The banner's curl lines that pay INV001 to the Paybill from the M-Pesa menu (the
    simulator's C2B simulate), with the simulator's public demo credentials only."""
    from mpesa_devtools import demo, simulator

    sim = f"http://127.0.0.1:{sim_port}"
    credentials = (f"{simulator.DEMO_CONSUMER_KEY}:{simulator.DEMO_CONSUMER_SECRET}"
                   if config.consumer_key == simulator.DEMO_CONSUMER_KEY
                   else "$MPESA_CONSUMER_KEY:$MPESA_CONSUMER_SECRET")
    return [
        f"Pay INV001 from the M-Pesa menu to Paybill {config.c2b_shortcode} (the receipt is"
        " logged here as the confirmation arrives: c2b confirmation ... outcome=received):",
        f"  T=$(curl -s -u {credentials} '{sim}/oauth/v1/generate?grant_type=client_credentials'"
        " | sed 's/.*\"access_token\": *\"\\([^\"]*\\)\".*/\\1/')",
        f"  curl -s -X POST {sim}/mpesa/c2b/v1/simulate -H \"Authorization: Bearer $T\""
        " -H 'Content-Type: application/json'"
        f" -d '{{\"ShortCode\":\"{config.c2b_shortcode}\",\"CommandID\":"
        f"\"CustomerPayBillOnline\",\"Amount\":10,\"Msisdn\":\"{demo.C2B_TEST_MSISDN}\","
        "\"BillRefNumber\":\"INV001\"}'",
    ]


def check_config(environ):
    """Print the settings by their variables (secrets masked) and hints for near misses,
    or every problem; exit status 2 when the gateway would not start."""
    for hint in settings.near_misses(environ):
        print(f"note: {hint}", file=sys.stderr)
    try:
        config = settings.load_config(environ)
    except settings.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        made = initiator.from_config(config)  # the credential, made as at start-up
    except settings.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name, value in config.by_variable().items():
        print(f"{name} = {value}")
    print("# initiator (refunds, code checks, /balance): " + (
        "off: they answer 501" if made is None else
        f"{made.name}, its credential " + ("as MPESA_SECURITY_CREDENTIAL gives it"
                                           if config.security_credential else
                                           "made from the password and MPESA_CERT_FILE")))
    print(f"# register-c2b would register for MPESA_C2B_SHORTCODE={config.c2b_shortcode}"
          f" (ResponseType {config.c2b_response_type}), each signed (the signature is the"
          " URL's secret: shown masked):")
    urls = c2b_urls(config)
    for kind, url in urls.items():
        print(f"#   {kind}: {url.rsplit('/', 1)[0]}/{settings.MASK}")
    for problem in c2b_url_problems(config, urls):
        print(f"#   but: {problem}")
    return 0


def reconcile_once(config, tx_id=None, checkout_request_id=None):
    """One reconciliation pass for cron / Task Scheduler (the same work the thread does),
    or, with `tx_id` (a gateway id or a CheckoutRequestID), one query of that transaction
    now (an operator's tool). `checkout_request_id`: teach a row that never learnt it
    (the merchant's 202 carried it) before the query."""
    services = command_services(config)
    try:
        worker = services.new_reconciler()
        if checkout_request_id is not None:
            if services.ledger.learn_checkout_request_id(tx_id, checkout_request_id) is None:
                print(f"reconcile tx={tx_id}: not learnt (no such row, not unknown, already"
                      " has a CheckoutRequestID, or another row holds that one)",
                      file=sys.stderr)
                return 1
        if tx_id is not None:
            result, row = worker.check_now(tx_id)
            if row is None:
                print(f"reconcile tx={tx_id} not found", file=sys.stderr)
                return 1
            print(f"reconcile tx={row['id']} result={result} status={row['status']}",
                  flush=True)
            return 0
        results = worker.run_once()
        services.ledger.prune_idempotency()
    finally:
        services.close()
    summary = " ".join(f"{k}={v}" for k, v in sorted(results.items())) or "nothing due"
    print(f"reconcile {summary}", flush=True)
    return 0


def deliver_once(config):
    """One webhook pass for cron / Task Scheduler: the same work the sender thread does."""
    services = command_services(config)
    try:
        results = services.new_sender().run_once()
    finally:
        services.close()
    summary = " ".join(f"{k}={v}" for k, v in sorted(results.items())) or "nothing due"
    print(f"deliver {summary}", flush=True)
    return 0


def resume_initiator(config):
    """Lift the stop a refused initiator (2001, 8006) put on every initiator call, for the
    configuration as it is: after the API operator was unlocked on the Daraja portal, when
    its name and credential were right all along."""
    made = initiator.from_config(config)
    if made is None:
        print("no initiator is configured (MPESA_INITIATOR_NAME): nothing to resume",
              file=sys.stderr)
        return 2
    services = command_services(config)
    try:
        lifted = services.ledger.lift_initiator_stop(made.fingerprint)
    finally:
        services.close()
    print("resume-initiator: " + (f"the stop (result code {lifted['result_code']}) is lifted;"
                                  " initiator calls go again" if lifted else
                                  "this configuration was not stopped"), flush=True)
    return 0


# Words Safaricom refuses anywhere in a C2B URL, host included, in any case.
C2B_FORBIDDEN_WORDS = ("m-pesa", "mpesa", "safaricom", "exec", "exe", "cmd", "sql", "query")


def c2b_urls(config):
    """The two URLs `register-c2b` registers for MPESA_C2B_SHORTCODE: {kind: url}."""
    signer = CallbackSigner(config.secret, config.callback_base_url)
    return {kind: signer.c2b_url(kind) for kind in ("confirmation", "validation")}


def c2b_url_problems(config, urls):
    """Why Safaricom would refuse to register `urls`, checked before calling it."""
    problems = [f"the {kind} URL holds {word!r}, which Safaricom refuses in C2B URLs (change"
                " the host in MPESA_CALLBACK_BASE_URL)"
                for kind, url in urls.items() for word in C2B_FORBIDDEN_WORDS
                if word in url.lower()][:1]
    if config.environment == "production" and not config.callback_base_url.startswith("https"):
        problems.append("production C2B URLs must be https://")
    return problems


def register_c2b(config, version):
    """Register the Paybill/Till URLs of MPESA_C2B_SHORTCODE with Daraja; one message for
    each answer Daraja gives (exit 0 registered, 1 refused or unreachable, 2 bad URLs)."""
    from mpesa_gateway import daraja

    urls = c2b_urls(config)
    problems = c2b_url_problems(config, urls)
    if problems:
        raise StartupError(f"register-c2b: {problems[0]}")
    services = command_services(config)
    shortcode = config.c2b_shortcode
    try:
        said = services.daraja.register_c2b(
            shortcode=shortcode, response_type=config.c2b_response_type,
            confirmation_url=urls["confirmation"], validation_url=urls["validation"],
            version=version)
    except daraja.DarajaError as exc:
        print(f"register-c2b shortcode={shortcode}: {c2b_refusal(exc, shortcode)}",
              file=sys.stderr)
        return 1
    finally:
        services.close()
    print(f"register-c2b shortcode={shortcode} response_type={config.c2b_response_type}"
          f" api={version}: registered ({said})", flush=True)
    for kind, url in urls.items():  # what Safaricom's portal will list for the shortcode
        print(f"  {kind}: {url}", flush=True)
    return 0


def c2b_refusal(exc, shortcode):
    """What a refused registration means, in one sentence."""
    message = (exc.error_message or "").lower()
    if "already registered" in message:
        return ("already registered: production URLs are registered once; to change them,"
                " delete them in Safaricom's portal (Self Services, URL Management) first")
    if "addurlvault" in message or "responsecode 409" in message:
        return (f"Daraja will not register URLs for {shortcode} (a shortcode for Lipa Na"
                " M-Pesa Online only, as the sandbox's 174379, cannot have them): set"
                " MPESA_C2B_SHORTCODE to a C2B shortcode, 600984 in the sandbox")
    if exc.http_status is None:
        return f"Daraja could not be reached or did not answer ({exc.reason}); try again"
    if exc.reason == "unparsable_response":
        return f"Daraja's answer did not say they were registered (HTTP {exc.http_status})"
    return (f"Daraja refused it ({exc.error_code or exc.http_status}:"
            f" {exc.error_message or 'no message'})")


def show_spools(directory):
    """Print every spool in `directory` with its entries, phones and CheckoutRequestIDs
    masked (an operator's tool; it changes nothing)."""
    from mpesa_gateway import recording
    from mpesa_ledger import spool

    mask = logs.RedactFilter().scrub
    paths = spool.spool_files(directory)
    quarantine = os.path.join(directory, spool.QUARANTINE)
    if os.path.exists(quarantine):
        paths.append(quarantine)  # entries set aside: an operator decides
    if not paths:
        print(f"spool {directory}: empty", flush=True)
    for path in paths:
        try:
            entries = spool.read_entries(path)
        except OSError as exc:  # Windows: a live process holds it
            print(f"spool {path}: unreadable ({exc.strerror or exc})", flush=True)
            continue
        print(f"spool {path}: entries={len(entries)}", flush=True)
        for entry in entries:
            print(mask(recording.describe(entry)), flush=True)
    return 0


def migrate_ledger(source, target):
    """Copy a ledger into an empty one and verify it (ledger_move); exit 2 if refused."""
    try:
        counts, amount = ledger_move.run(source, target)
    except (ledger_move.MoveError, store.LedgerOpenError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    summary = " ".join(f"{table}={n}" for table, n in counts.items())
    print(f"migrate-ledger copied {summary} amount_total={amount} into"
          f" {settings.masked_url(target)}; verified", flush=True)
    return 0


def main(create_app, argv=None):
    """Run the command `argv` names; `create_app` (mpesa_wsgi's) builds the served app."""
    parser = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]) or "mpesa-wsgi",
                                     description="M-Pesa STK Push gateway")
    parser.add_argument("--version", action="version", version=f"mpesa-wsgi {settings.VERSION}")
    parser.add_argument("command", nargs="?",
                        choices=("serve", "reconcile", "deliver", "migrate", "migrate-ledger",
                                 "spool", "register-c2b", "resume-initiator"),
                        default="serve", help="serve (default), or run one reconciliation"
                        " pass or one webhook delivery pass, or create or upgrade the"
                        " ledger's schema, or show the local spool, or register the"
                        " Paybill/Till URLs with Daraja, or lift the stop Daraja's refusal"
                        " of the initiator put on refunds and code checks, and exit")
    parser.add_argument("--tx", metavar="ID",
                        help="with reconcile: query this one transaction (its id or"
                        " CheckoutRequestID) now")
    parser.add_argument("--checkout-request-id", metavar="ws_CO_…",
                        help="with reconcile --tx: the CheckoutRequestID the row never learnt"
                        " (the merchant's 202 carried it)")
    parser.add_argument("--v1", action="store_true",
                        help="with register-c2b: Daraja's v1 API (its confirmations carry the"
                        " MSISDN hashed; v2, the default, masked)")
    parser.add_argument("--dir", metavar="DIR",
                        help="with spool: the spool folder (default: GATEWAY_SPOOL_DIR's)")
    parser.add_argument("--from", dest="source", metavar="LEDGER",
                        help="with migrate-ledger: the ledger to copy (a SQLite path)")
    parser.add_argument("--to", dest="target", metavar="LEDGER",
                        help="with migrate-ledger: the empty ledger to copy into (a URL)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check-config", action="store_true",
                      help="print the resolved settings (secrets masked) and exit")
    mode.add_argument("--demo", action="store_true",
                      help="run the gateway against the built-in Daraja simulator on loopback")
    args = parser.parse_args(argv)
    if args.v1 and args.command != "register-c2b":
        parser.error("--v1 goes with the register-c2b command")
    if args.tx is not None and args.command != "reconcile":
        parser.error("--tx goes with the reconcile command")
    if args.checkout_request_id is not None and args.tx is None:
        parser.error("--checkout-request-id goes with reconcile --tx")
    if args.check_config:
        return check_config(os.environ)
    if args.command == "migrate-ledger":
        if not (args.source and args.target):
            parser.error("migrate-ledger needs --from and --to")
        return migrate_ledger(args.source, args.target)
    try:
        if args.demo:
            run_demo(create_app, os.environ)
            return 0
        if args.command == "spool" and args.dir is not None:
            return show_spools(args.dir)
        config = settings.load_config(
            os.environ, only=LEDGER_SETTINGS if args.command == "migrate" else None)
        configure_logging(config)
        for hint in settings.near_misses(os.environ):
            log.warning("config %s", hint)
        if args.command == "reconcile":
            return reconcile_once(config, args.tx, args.checkout_request_id)
        if args.command == "spool":
            return show_spools(config.spool_dir)
        if args.command == "deliver":
            return deliver_once(config)
        if args.command == "resume-initiator":
            return resume_initiator(config)
        if args.command == "register-c2b":
            return register_c2b(config, "v1" if args.v1 else "v2")
        if args.command == "migrate":
            return migrate(config)
        cpu = pin_cpu(config.cpu_affinity)  # before anything starts: a bad CPU stops here
        if cpu is not None:
            log.info("pinned to cpu=%d", cpu)
        app = build_app(create_app, config)
        try:
            serve(app.services, create_server(app, config.host, config.port, config))
        finally:
            app.services.close()
    except (settings.ConfigError, StartupError) as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0
