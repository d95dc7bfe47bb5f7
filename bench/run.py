"""Benchmark the raw WSGI gateway against its Flask and Falcon versions, on loopback.

`python bench/run.py` (or `make bench`): starts the Daraja simulator as its own process
and each variant under waitress with identical settings (threads, pool size, a fresh
ledger on local disk, logging at INFO), drives it with wrk on 127.0.0.1 (warm-up first,
variants interleaved A B C A B C, several rounds, medians reported) and prints a markdown
table with each variant's ratio to the raw gateway. On a machine with 2+ cores and
`taskset`, the server is pinned to CPU 0 and wrk + simulator to CPU 1.

Workloads: `GET /health` (web-layer cost; the bare hello app is the reference),
payments end to end (`POST /stkpush` with distinct phones, callbacks on, a push slot per
connection), capacity (simulator latency 1000 ms, 64 threads, 60 slots, a client per
slot), and rush (simulator
latency 1000 ms, the default 32 threads, 4 × 32 push clients that honour
`503 gateway_busy` + Retry-After, while a reader times `GET /transactions/<id>` and
`/health` every 50 ms and the simulator times its callbacks), and ledgers (the raw
gateway's payments on SQLite, on PostgreSQL, and as two processes sharing PostgreSQL; a
throwaway cluster from Debian's `postgresql` package, its CPU counted apart).

Writes bench/results/<timestamp>.json and a PNG chart (matplotlib).
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TICKS = os.sysconf("SC_CLK_TCK")

WORKLOADS = {
    "health": dict(variants=("hello", "raw", "flask", "falcon"), path="/health", lua=None,
                   threads=8, connections=32, sim_latency_ms=0),
    # A push slot for every connection: this measures the cost of a payment, not admission.
    "payments": dict(variants=("raw", "flask", "falcon"), path="/stkpush", lua="rush.lua",
                     threads=20, push_slots=16, connections=16, sim_latency_ms=0),
    # The same payments with merchant webhooks on: the outbox row rides in the settling
    # commit, the sender delivers to a receiver in the runner (CPU per payment, before/after).
    "webhooks": dict(variants=("raw", "flask", "falcon"), path="/stkpush", lua="rush.lua",
                     threads=20, push_slots=16, connections=16, sim_latency_ms=0,
                     webhooks=True),
    # How many payments the slots carry at Daraja's 1 s: one client per slot.
    "capacity": dict(variants=("raw", "flask", "falcon"), path="/stkpush", lua="rush.lua",
                     threads=64, push_slots=60, connections=60, sim_latency_ms=1000,
                     timeout_s=20),
    "rush": dict(variants=("raw", "flask", "falcon"), path="/stkpush", lua="rush.lua",
                 threads=32, connections=128, sim_latency_ms=1000, timeout_s=20),
    # The raw gateway's payments on each ledger: SQLite, PostgreSQL (one process), and two
    # processes sharing PostgreSQL (each driven by half the clients).
    "ledgers": dict(variants=("sqlite", "postgresql", "postgresql-2proc"), path="/stkpush",
                    lua="rush.lua", threads=20, push_slots=16, connections=16,
                    sim_latency_ms=0),
}
LEDGER_VARIANTS = {"sqlite": 1, "postgresql": 1, "postgresql-2proc": 2}  # → processes
RUSH_POLL_S = 0.05


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with OPENER.open(url, timeout=5) as resp:
        return json.loads(resp.read())


def wait_up(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with OPENER.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_mem_mb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


def stop_process(proc, sig, timeout):
    """Ask a child to stop with `sig`; kill it if it is still there after `timeout` s."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pinned(cmd, cpu, mode):
    return ["taskset", "-c", str(cpu), *cmd] if mode == "pinned" else cmd


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def parse_wrk(text):
    out = {"requests": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0}
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else 0.0
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        out[key] = to_ms(*m.groups()) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    out["errors"] = errors
    return out


class Simulator:
    def __init__(self, mode, latency_ms, threads, callback_delay_s=1.0):
        self.port = free_port()
        env = dict(os.environ, MPESA_SIM_LATENCY_MS=str(latency_ms),
                   MPESA_SIM_CALLBACK_DELAY_S=str(callback_delay_s))
        cmd = [PY, "-m", "mpesa_devtools.simulator", "--port", str(self.port),
               "--threads", str(threads)]
        self.proc = subprocess.Popen(pinned(cmd, 1, mode), env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_up(self.url + "/_sim/stats")

    def stats(self):
        return get_json(self.url + "/_sim/stats")

    def timings(self):
        return get_json(self.url + "/_sim/timings")

    def reset_timings(self):
        OPENER.open(urllib.request.Request(self.url + "/_sim/timings", method="DELETE"),
                    timeout=5).read()

    def stop(self):
        stop_process(self.proc, signal.SIGINT, 10)


class Server:
    def __init__(self, variant, mode, sim_url, threads, workdir, api_key, push_slots=None,
                 webhook_url=None, db=None, reconcile=False):
        self.port = free_port()
        self.db = db or os.path.join(workdir, f"{variant}-{self.port}.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
        env.update({
            "MPESA_CONSUMER_KEY": "demo-consumer-key", "MPESA_CONSUMER_SECRET": "demo-consumer-secret",
            "MPESA_SHORTCODE": "174379",
            "MPESA_PASSKEY": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
            "MPESA_BASE_URL": sim_url, "MPESA_CALLBACK_BASE_URL": f"http://127.0.0.1:{self.port}",
            "GATEWAY_PORT": str(self.port), "GATEWAY_THREADS": str(threads), "GATEWAY_DB": self.db,
            "GATEWAY_API_KEYS": api_key, "GATEWAY_SECRET": secrets.token_hex(16),
            "GATEWAY_RATE": "1000000", "GATEWAY_BURST": "1000000",
            "GATEWAY_RECONCILE": "on" if reconcile else "off",
            "MPESA_CALLBACK_IP_POLICY": "off", "LOG_LEVEL": "INFO",
        })
        if push_slots is not None:
            env["GATEWAY_PUSH_SLOTS"] = str(push_slots)
        if webhook_url is not None:
            env.update(GATEWAY_WEBHOOK_URLS=f"default:{webhook_url}",
                       GATEWAY_WEBHOOK_SECRETS="default:" + WEBHOOK_SECRET,
                       GATEWAY_WEBHOOK_ALLOW_PRIVATE="on")
        cmd = [PY, os.path.join(ROOT, "bench", "serve.py"), variant]
        self.proc = subprocess.Popen(pinned(cmd, 0, mode), env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_up(self.url + "/health")
        time.sleep(0.2)
        self.idle_rss_mb = proc_mem_mb(self.proc.pid, "VmRSS")

    def cpu_s(self):
        return proc_cpu_s(self.proc.pid)

    def peak_rss_mb(self):
        return proc_mem_mb(self.proc.pid, "VmHWM")

    def slots(self):
        return get_json(self.url + "/health")["checks"].get("push_slots")

    def metrics(self):
        with OPENER.open(self.url + "/metrics", timeout=5) as resp:
            return resp.read().decode()

    def mean_push_s(self):
        """The mean time Daraja (the simulator) took per push, from the gateway's metrics."""
        found = dict(re.findall(r'daraja_call_duration_seconds_(sum|count)\{api="stk_push"\}'
                                r" ([0-9.e+]+)", self.metrics()))
        return float(found["sum"]) / float(found["count"]) if found.get("count") else None

    def ledger_steps(self):
        """{step: {"statements", "round_trips", "steps"}} from the gateway's metrics (a
        ledger with a server counts them; SQLite: {})."""
        found = {}
        for kind, step, value in re.findall(
                r'mpesa_gateway_ledger_(statements|round_trips|steps)_total\{step="([a-z_]+)"\}'
                r" ([0-9.e+]+)", self.metrics()):
            found.setdefault(step, {})[kind] = float(value)
        return found

    def ledger_counts(self):
        """(ledger writes made durable, COMMITs that did it), from the gateway's metrics."""
        text = self.metrics()
        found = dict(re.findall(r"mpesa_gateway_ledger_(commits|batches)_total ([0-9.e+]+)",
                                text))
        return float(found.get("commits", 0)), float(found.get("batches", 0))

    def busy(self):
        m = re.search(r"mpesa_gateway_push_busy_total ([0-9.e+]+)", self.metrics())
        return float(m.group(1)) if m else 0.0

    def pushes_202(self):
        """Pushes the gateway answered 202, by its own count: a push wrk dropped when its
        run ended still finished (and went to Daraja) and counts."""
        m = re.search(r'http_requests_total\{route="/stkpush",method="POST",status="202"\}'
                      r" ([0-9.e+]+)", self.metrics())
        return float(m.group(1)) if m else 0.0

    def one_payment(self, api_key):
        """A payment to read during the rush (made before it)."""
        req = urllib.request.Request(
            self.url + "/stkpush", method="POST",
            data=json.dumps({"phone": "0799999999", "amount": 10}).encode(),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
        with OPENER.open(req, timeout=30) as resp:
            return json.loads(resp.read())["id"]

    def succeeded(self):
        query = "SELECT COUNT(*) FROM transactions WHERE status='succeeded'"
        if self.db.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(self.db) as conn:
                return conn.execute(query).fetchone()[0]
        with sqlite3.connect(self.db) as conn:
            return conn.execute(query).fetchone()[0]

    def stop(self):
        stop_process(self.proc, signal.SIGTERM, 30)  # graceful: in-flight pushes finish


def wrk(url, spec, duration, mode, api_key):
    # rush.lua's Retry-After wait is per wrk thread: one thread per client makes it per client.
    wrk_threads = spec["connections"] if spec["lua"] == "rush.lua" else (
        2 if spec["connections"] > 32 else 1)
    cmd = ["wrk", "-t", str(wrk_threads), "-c", str(spec["connections"]),
           "-d", f"{max(1, round(duration))}s", "--timeout", f"{spec.get('timeout_s', 5)}s",
           "--latency"]
    if spec["lua"]:
        cmd += ["-s", os.path.join(ROOT, "bench", spec["lua"])]
    cmd.append(url + spec["path"])
    env = dict(os.environ, BENCH_API_KEY=api_key, BENCH_CLIENTS=str(wrk_threads),
               BENCH_PHONE_BASE=str(secrets.randbelow(100_000_000)))
    out = subprocess.run(pinned(cmd, 1, mode), env=env, capture_output=True, text=True,
                         timeout=duration + 60)
    result = parse_wrk(out.stdout)
    m = re.search(r"rush status 202=(\d+) 503=(\d+) other=(\d+)", out.stdout)
    if m:  # rush.lua counts answers itself: 503 gateway_busy is an answer, not an error
        result["accepted"], result["busy"], other = (int(x) for x in m.groups())
        socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout"
                           r" (\d+)", out.stdout)
        result["errors"] = other + (sum(int(x) for x in socket.groups()) if socket else 0)
    return result


class Reader:
    """Times GET /transactions/<id> and GET /health, one every RUSH_POLL_S, in a thread."""

    def __init__(self, url, tx_id, api_key):
        import threading
        self.samples = {"read": [], "health": []}
        self._stop = threading.Event()
        self._requests = [("read", urllib.request.Request(
            f"{url}/transactions/{tx_id}", headers={"Authorization": f"Bearer {api_key}"})),
            ("health", urllib.request.Request(f"{url}/health"))]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        n = 0
        while not self._stop.wait(RUSH_POLL_S):
            kind, req = self._requests[n % 2]
            n += 1
            started = time.monotonic()
            try:
                with OPENER.open(req, timeout=30) as resp:
                    resp.read()
                    ok = resp.status == 200
            except OSError:
                ok = False
            self.samples[kind].append((time.monotonic() - started) * 1000 if ok else None)

    def stop(self):
        self._stop.set()
        self._thread.join(35)

    def p99(self, kind):
        times = sorted(t for t in self.samples[kind] if t is not None)
        return times[min(len(times) - 1, int(0.99 * len(times)))] if times else None

    def failures(self, kind):
        return sum(1 for t in self.samples[kind] if t is None)


def run_ledgers(spec, variant, mode, sim, workdir, duration, warmup, api_key, cluster):
    """Payments end to end on one ledger engine, with one or two gateway processes (each
    driven by its share of the clients); CPU per payment of the gateways and of
    PostgreSQL's processes."""
    db = cluster.new_database() if variant.startswith("postgresql") else None
    count = LEDGER_VARIANTS[variant]
    share = dict(spec, connections=spec["connections"] // count)
    # The reconciler runs (its passes find nothing due: callbacks come within a second), so
    # a claim's cost is counted too.
    servers = [Server("raw", mode, sim.url, spec["threads"], workdir, api_key,
                      spec["push_slots"], db=db, reconcile=True) for _ in range(count)]
    try:
        def drive(seconds):
            out = [None] * count
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(
                i, wrk(servers[i].url, share, seconds, mode, api_key))) for i in range(count)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out

        if warmup:
            drive(warmup)
        steps0 = [s.ledger_steps() for s in servers]
        pushes0 = sum(s.pushes_202() for s in servers)
        cpu0 = sum(s.cpu_s() for s in servers)
        db_cpu0 = cluster.cpu_s() if db else 0.0
        t0 = time.monotonic()
        runs = drive(duration)
        elapsed = time.monotonic() - t0
        cpu = sum(s.cpu_s() for s in servers) - cpu0
        db_cpu = (cluster.cpu_s() - db_cpu0) if db else 0.0
        requests = sum(r.get("accepted", r["requests"]) for r in runs)  # 202s: payments
        time.sleep(1.5)  # the last callbacks land
        steps = step_deltas(steps0, [s.ledger_steps() for s in servers])
        return dict(
            **round_trips_per(steps, sum(s.pushes_202() for s in servers) - pushes0),
            rps=requests / elapsed, requests=requests,
            p50_ms=max(r["p50_ms"] or 0 for r in runs),
            p99_ms=max(r["p99_ms"] or 0 for r in runs),
            errors=sum(r["errors"] for r in runs), processes=count,
            cpu_ms_per_payment=cpu / requests * 1000 if requests else None,
            db_cpu_ms_per_payment=db_cpu / requests * 1000 if requests else None,
            server_cpu_util=cpu / elapsed, db_cpu_util=db_cpu / elapsed,
            succeeded=servers[0].succeeded(),
            peak_rss_mb=max(s.peak_rss_mb() for s in servers))
    finally:
        for s in servers:
            s.stop()


# A payment's own ledger steps (push, Daraja's answer, callback) and the pool's checks.
PAYMENT_STEPS = ("begin_push", "mark_accepted", "mark_not_accepted", "settle_callback",
                 "pool_check")


def step_deltas(before, after):
    """{step: {kind: increase}} summed over the servers."""
    total = {}
    for b, a in zip(before, after):
        for step, kinds in a.items():
            for kind, value in kinds.items():
                grown = value - b.get(step, {}).get(kind, 0.0)
                total.setdefault(step, {}).setdefault(kind, 0.0)
                total[step][kind] += grown
    return total


def round_trips_per(steps, payments):
    """Round trips (and statements) per payment, per callback and per reconcile claim,
    from the ledger's own counts (None where it counts none: SQLite)."""
    def per(step):
        s = steps.get(step, {})
        return s["round_trips"] / s["steps"] if s.get("steps") else None

    if not steps or not payments:
        return dict(trips_per_payment=None, statements_per_payment=None,
                    trips_per_callback=None, trips_per_claim=None)
    return dict(
        trips_per_payment=sum(steps.get(s, {}).get("round_trips", 0) for s in PAYMENT_STEPS)
        / payments,
        statements_per_payment=sum(steps.get(s, {}).get("statements", 0)
                                   for s in PAYMENT_STEPS) / payments,
        trips_per_callback=per("settle_callback"), trips_per_claim=per("claim_next"))


def ledgers_markdown(rows):
    lines = ["**ledgers** (the raw gateway's payments end to end, 16 clients, simulator 0 ms;"
             " two processes: 8 clients each)", "",
             "| ledger | processes | payments/s | × SQLite | p99 ms | errors |"
             " gateway CPU ms/payment | PostgreSQL CPU ms/payment | gateway CPU | PostgreSQL CPU"
             " | succeeded | round trips/payment (statements) | per callback | per claim |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = rows.get("sqlite", {}).get("rps")
    for variant, r in rows.items():
        lines.append(
            f"| {variant} | {r['processes']:.0f} | {fmt(r['rps'], 0)} |"
            f" {fmt(r['rps'] / base if base else None, 2)} | {fmt(r['p99_ms'], 2)} |"
            f" {fmt(r['errors'], 0)} | {fmt(r['cpu_ms_per_payment'], 2)} |"
            f" {fmt(r['db_cpu_ms_per_payment'], 2)} | {fmt(r['server_cpu_util'] * 100, 0)}% |"
            f" {fmt(r['db_cpu_util'] * 100, 0)}% | {fmt(r['succeeded'], 0)} |"
            f" {fmt(r.get('trips_per_payment'), 1)} ({fmt(r.get('statements_per_payment'), 1)})"
            f" | {fmt(r.get('trips_per_callback'), 1)} | {fmt(r.get('trips_per_claim'), 1)} |")
    return lines + [""]


def run_one(workload, spec, variant, mode, sim, workdir, duration, warmup, api_key):
    receiver = WebhookReceiver() if spec.get("webhooks") else None
    server = Server(variant, mode, sim.url, spec["threads"], workdir, api_key,
                    spec.get("push_slots"), receiver.url if receiver else None)
    try:
        tokens_before = sim.stats()["token_requests"]
        tx_id = server.one_payment(api_key) if workload == "rush" else None
        if warmup:
            wrk(server.url, spec, warmup, mode, api_key)
            time.sleep(spec["sim_latency_ms"] / 1000 * 1.5)  # the warm-up's last pushes end
        reader = None
        if workload == "rush":
            reader = Reader(server.url, tx_id, api_key)
            sim.reset_timings()
            failed0 = sim.stats()["callbacks_failed"]
        pushes0, busy0 = (server.pushes_202(), server.busy()) if spec["lua"] == "rush.lua" \
            else (0, 0)
        ledger0 = server.ledger_counts() if spec["lua"] else (0, 0)
        cpu0, sim_cpu0, t0 = server.cpu_s(), proc_cpu_s(sim.proc.pid), time.monotonic()
        result = wrk(server.url, spec, duration, mode, api_key)
        elapsed = time.monotonic() - t0
        if "accepted" in result:  # rush.lua: 202s a second, against what the slots allow
            time.sleep(spec["sim_latency_ms"] / 1000 * 1.5)  # pushes in flight at the end
            result.update(pushes_per_s=(server.pushes_202() - pushes0) / elapsed,
                          busy=server.busy() - busy0,  # gateway_busy only, by its counter
                          slots=server.slots(), daraja_push_s=server.mean_push_s())
        if reader is not None:
            reader.stop()
            failed = sim.stats()["callbacks_failed"] - failed0
            time.sleep(1.5 + spec["sim_latency_ms"] / 1000)  # the last callbacks land
            timings = sim.timings()
            result.update(
                read_p99_ms=reader.p99("read"), health_p99_ms=reader.p99("health"),
                reader_failures=reader.failures("read") + reader.failures("health"),
                callback_p99_ms=timings["p99_ms"], callback_max_ms=timings["max_ms"],
                callbacks_late=timings["late_1s"], callbacks=timings["count"],
                callbacks_lost=failed)
        cpu = server.cpu_s() - cpu0
        sim_cpu = proc_cpu_s(sim.proc.pid) - sim_cpu0
        if spec["lua"]:
            time.sleep(1.5)  # let the last callbacks land
            result["succeeded"] = server.succeeded()
            commits, batches = (b - a for a, b in zip(ledger0, server.ledger_counts(),
                                                      strict=True))
            paid = result.get("accepted") or result["requests"]
            result.update(commits_per_payment=commits / paid if paid else None,
                          batches_per_payment=batches / paid if paid else None)
        if receiver is not None:
            time.sleep(2.0)  # the sender's last pass
            result["webhooks_received"] = receiver.count
        result.update(
            cpu_s_per_1k=(cpu / result["requests"] * 1000) if result["requests"] else None,
            server_cpu_util=cpu / elapsed, sim_cpu_util=sim_cpu / elapsed,
            peak_rss_mb=server.peak_rss_mb(), idle_rss_mb=server.idle_rss_mb,
            oauth_calls=sim.stats()["token_requests"] - tokens_before)
        return result
    finally:
        server.stop()
        if receiver is not None:
            receiver.stop()


WEBHOOK_SECRET = "whsec_" + "YmVuY2gtd2ViaG9vay1zaWduaW5nLXNlY3JldC0wMTIz"


class WebhookReceiver:
    """A merchant endpoint in the runner: answers every event 204 and counts them."""

    def __init__(self):
        import threading
        import wsgiref.simple_server

        self.count = 0

        def app(environ, start_response):
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            self.count += 1
            start_response("204 No Content", [])
            return [b""]

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass

        self._server = wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                                         handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self._server.server_port}/events"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


def cold_start_ms(workdir):
    code = ("import time; t=time.perf_counter(); import mpesa_wsgi, config, os; "
            "app=mpesa_wsgi.create_app(config.load_config(os.environ)); "
            "print((time.perf_counter()-t)*1000); app.services.close()")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPESA_", "GATEWAY_"))}
    env.update({"MPESA_CONSUMER_KEY": "k", "MPESA_CONSUMER_SECRET": "s", "MPESA_SHORTCODE": "174379",
                "MPESA_PASSKEY": "p", "MPESA_CALLBACK_BASE_URL": "http://127.0.0.1:9",
                "GATEWAY_API_KEYS": "k" * 16, "GATEWAY_SECRET": "s" * 16,
                "GATEWAY_DB": os.path.join(workdir, "cold.db"), "GATEWAY_RECONCILE": "off"})
    times = []
    for _ in range(5):
        out = subprocess.run([PY, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        times.append(float(out.stdout.strip()))
    return statistics.median(times)


def postgres_cluster():
    """A throwaway PostgreSQL cluster (the tests' helper: Debian's binaries, loopback)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import postgres_server

    reason = postgres_server.missing()
    if reason is not None:
        sys.exit(f"the ledgers workload needs PostgreSQL: {reason}")
    return postgres_server.Cluster()


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


WORST_OF = ("errors", "callbacks_late", "callbacks_lost", "reader_failures")  # a bad round shows


def summarize(results):
    table = {}
    for workload, by_variant in results.items():
        table[workload] = {}
        for variant, runs in by_variant.items():
            table[workload][variant] = {
                k: (max(r.get(k) or 0 for r in runs) if k in WORST_OF else median_of(runs, k))
                for k in runs[0]}
    return table


def fmt(v, digits=1):
    return "–" if v is None else f"{v:,.{digits}f}"


def markdown(table, mode, machine):
    lines = [f"Mode: {mode}. Machine: {machine}.", ""]
    for workload, rows in table.items():
        if workload == "rush":
            lines += rush_markdown(rows)
            continue
        if workload == "ledgers":
            lines += ledgers_markdown(rows)
            continue
        base = rows.get("raw", {})
        lines += [f"**{workload}**", "",
                  "| variant | req/s | × raw | p50 ms | p99 ms | errors | server CPU s/1k req"
                  " | server CPU | sim CPU | peak RSS MB | OAuth calls |"
                  + (" succeeded | commits / fsync batches per payment |"
                     if workload != "health" else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|"
                  + ("---|---|" if workload != "health" else "")]
        for variant, r in rows.items():
            ratio = (r["rps"] / base["rps"]) if base.get("rps") else None
            lines.append(
                f"| {variant} | {fmt(r['rps'], 0)} | {fmt(ratio, 2)} | {fmt(r['p50_ms'], 2)} | "
                f"{fmt(r['p99_ms'], 2)} | {fmt(r['errors'], 0)} | {fmt(r['cpu_s_per_1k'], 3)} | "
                f"{fmt(r['server_cpu_util'] * 100, 0)}% | {fmt(r['sim_cpu_util'] * 100, 0)}% | "
                f"{fmt(r['peak_rss_mb'])} | {fmt(r['oauth_calls'], 0)} |"
                + (f" {fmt(r.get('succeeded'), 0)} | {fmt(r.get('commits_per_payment'), 2)} /"
                   f" {fmt(r.get('batches_per_payment'), 2)} |" if workload != "health" else ""))
        lines.append("")
    return "\n".join(lines)


def rush_markdown(rows):
    lines = ["**rush** (simulator 1000 ms, 32 threads, 128 push clients honouring Retry-After,"
             " reader every 50 ms)", "",
             "| variant | pushes/s | ÷ (slots ÷ 1 s) | Daraja s/push | slots busy | 202 | 503 busy"
             " | other/socket errors"
             " | read p99 ms | /health p99 ms | reader failures | callback p99 ms |"
             " callback max ms | callbacks late > 1 s / lost | server CPU | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, r in rows.items():
        share = r["pushes_per_s"] / r["slots"] if r.get("slots") else None
        # Slot use: pushes/s × the time Daraja really took each ÷ slots (Little's law).
        busy = (r["pushes_per_s"] * r["daraja_push_s"] / r["slots"]
                if r.get("slots") and r.get("daraja_push_s") else None)
        lines.append(
            f"| {variant} | {fmt(r['pushes_per_s'])} | {fmt(share, 2)} |"
            f" {fmt(r.get('daraja_push_s'), 2)} | {fmt(busy * 100 if busy else None, 0)}% |"
            f" {fmt(r['accepted'], 0)} |"
            f" {fmt(r['busy'], 0)} | {fmt(r['errors'], 0)} | {fmt(r['read_p99_ms'])} |"
            f" {fmt(r['health_p99_ms'])} | {fmt(r['reader_failures'], 0)} |"
            f" {fmt(r['callback_p99_ms'])} | {fmt(r['callback_max_ms'])} |"
            f" {fmt(r['callbacks_late'], 0)} / {fmt(r.get('callbacks_lost'), 0)} |"
            f" {fmt(r['server_cpu_util'] * 100, 0)}% |"
            f" {fmt(r['peak_rss_mb'])} |")
    return lines + [""]


def chart(table, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(table), figsize=(4.2 * len(table), 7), squeeze=False)
    for col, (workload, rows) in enumerate(table.items()):
        names = list(rows)
        axes[0][col].bar(names, [rows[n]["rps"] for n in names], color="#2f6f4f")
        axes[0][col].set_title(f"{workload}: requests/s")
        axes[1][col].bar(names, [rows[n]["p99_ms"] or 0 for n in names], color="#8a4b2a")
        axes[1][col].set_title(f"{workload}: p99 latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", default="hello,raw,flask,falcon")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--capacity-connections", type=int,
                        default=WORKLOADS["capacity"]["connections"])
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    mode = "pinned" if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else "unpinned"
    machine = f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {os.uname().machine}"
    print(f"mode: {mode} (server on CPU 0, wrk and simulator on CPU 1)" if mode == "pinned"
          else "mode: unpinned (no taskset or a single CPU)", flush=True)
    WORKLOADS["capacity"]["connections"] = args.capacity_connections
    api_key = "bench_" + secrets.token_hex(12)
    wanted = set(args.variants.split(",")) | set(LEDGER_VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mpesa-bench-") as workdir:
        cold = cold_start_ms(workdir)
        for workload in args.workloads.split(","):
            spec = WORKLOADS[workload]
            variants = [v for v in spec["variants"] if v in wanted]
            sim = Simulator(mode, spec["sim_latency_ms"], threads=max(16, spec["connections"] + 8))
            cluster = postgres_cluster() if workload == "ledgers" else None
            try:
                results[workload] = {v: [] for v in variants}
                for rnd in range(args.rounds):
                    for variant in variants:  # interleaved: A B C A B C …
                        duration = args.duration * (2 if workload in ("capacity", "rush")
                                                    else 1)
                        r = (run_ledgers(spec, variant, mode, sim, workdir, duration,
                                         args.warmup, api_key, cluster) if cluster else
                             run_one(workload, spec, variant, mode, sim, workdir, duration,
                                     args.warmup, api_key))
                        results[workload][variant].append(r)
                        print(f"{workload:9s} round {rnd + 1} {variant:7s} {r['rps']:9.0f} req/s "
                              f"p99 {fmt(r['p99_ms'], 2)} ms errors {r['errors']} "
                              f"cpu {fmt(r['server_cpu_util'] * 100, 0)}%", flush=True)
            finally:
                sim.stop()
                if cluster is not None:
                    cluster.close()
    table = summarize(results)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    report = markdown(table, mode, machine)
    report += f"\ncreate_app cold start: {cold:.0f} ms (median of 5)\n"
    if "capacity" in table:
        for v, r in table["capacity"].items():
            limit = r["slots"] / 1.0  # slots ÷ Daraja's 1 s
            report += (f"capacity {v}: {r['pushes_per_s']:.1f} payments/s = "
                       f"{r['pushes_per_s'] / limit:.2f} × slots ÷ latency ({limit:.0f}/s);"
                       f" Daraja took {r['daraja_push_s']:.2f} s a push, so the slots were"
                       f" {r['pushes_per_s'] * r['daraja_push_s'] / r['slots'] * 100:.0f}%"
                       f" busy; {r['busy']:.0f} answered 503 gateway_busy\n")
    print("\n" + report)
    with open(os.path.join(args.out, f"{stamp}.json"), "w") as f:
        json.dump({"mode": mode, "machine": machine, "cold_start_ms": cold, "args": vars(args),
                   "runs": results, "medians": table}, f, indent=2)
    with open(os.path.join(args.out, f"{stamp}.md"), "w") as f:
        f.write(report)
    chart(table, os.path.join(args.out, f"{stamp}.png"))
    print(f"wrote {os.path.join(args.out, stamp)}.json, .md and .png")


if __name__ == "__main__":
    main()
