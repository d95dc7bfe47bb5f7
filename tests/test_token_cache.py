"""Token cache: single flight, early refresh, careful invalidation.

OAuth calls are counted at the simulator, over a real loopback socket.
"""

import threading
import time

import pytest

import config
from helpers import FakeClock, base_env, serve, wait_for
from mpesa_gateway import daraja
from token_cache import TokenCache, TokenError, TokenWaitTimeout, expires_in_seconds

THREADS = 64


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def oauth_gate():
    """Set: the simulator answers OAuth at once; cleared: OAuth answers wait for it."""
    gate = threading.Event()
    gate.set()
    yield gate
    gate.set()  # never leave a server thread parked


@pytest.fixture
def sim_url(sim, oauth_gate):
    """The simulator behind a gate on its OAuth route (the test decides when it answers)."""

    def gated(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/oauth"):
            oauth_gate.wait(60)
        return sim.sim(environ, start_response)

    server, url = serve(gated, threads=THREADS + 4)
    yield url
    server.shutdown()


@pytest.fixture
def client(sim_url, tmp_path, clock):
    cfg = config.load_config(dict(base_env(sim_url, tmp_path / "l.db"),
                                  MPESA_READ_TIMEOUT="30"))
    c = daraja.DarajaClient(cfg, daraja.build_pool(cfg), clock=clock)
    yield c
    c.close()


class Parked:
    """TokenCache's park seam: counts the callers waiting on another's fetch."""

    def __init__(self):
        self.count, self._lock = 0, threading.Lock()

    def __call__(self, done, timeout):
        with self._lock:
            self.count += 1
        return done.wait(timeout)


def _run_together(n, call):
    """Start n threads that meet at a barrier and then call `call()`; return (threads,
    results, errors)."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker():
        barrier.wait(30)
        try:
            results.append(call())
        except Exception as exc:  # noqa: BLE001 - collected and asserted by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results, errors


def test_64_threads_on_a_cold_cache_make_one_oauth_call(client, sim, oauth_gate, clock):
    oauth_gate.clear()  # hold the one OAuth answer until every other thread is waiting
    parked = Parked()
    cache = TokenCache(client.fetch_token, 300, clock=clock, park=parked)  # the client's fetch
    threads, tokens, errors = _run_together(THREADS, cache.get)
    wait_for(lambda: parked.count == THREADS - 1, timeout=30)  # all but the fetching one
    oauth_gate.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(tokens) == THREADS and len(set(tokens)) == 1
    assert sim.stats()["token_requests"] == 1


def test_token_is_reused_until_the_margin_then_refreshed(client, sim, clock):
    first = client.tokens.get()
    clock.now += 3599 - 300 - 1  # just inside "fresh": 3599 s token, 300 s margin
    assert client.tokens.get() == first
    assert sim.stats()["token_requests"] == 1
    clock.now += 2  # now inside the margin: refresh before Daraja expires it
    second = client.tokens.get()
    assert second != first
    assert sim.stats()["token_requests"] == 2


def test_invalidated_token_is_replaced_once(client, sim):
    old = client.tokens.get()
    client.tokens.invalidate(old)
    client.tokens.invalidate(old)  # a second thread saw the same rejection
    new = client.tokens.get()
    client.tokens.invalidate(old)  # late: the cache already holds `new`
    assert client.tokens.get() == new != old
    assert sim.stats()["token_requests"] == 2


def test_age_reports_seconds_since_fetch_without_the_token(client, clock):
    assert client.tokens.age() is None
    client.tokens.get()
    clock.now += 42
    assert client.tokens.age() == pytest.approx(42)


def test_a_failed_fetch_is_shared_by_its_waiters_and_not_cached(clock):
    calls, release = [], threading.Event()
    answers = [RuntimeError("oauth down"), ("tok", "3599")]  # what each fetch yields, in turn

    def fetch():
        calls.append(1)
        release.wait(30)  # the first fetch is held until every other caller waits on it
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    parked = Parked()
    cache = TokenCache(fetch, 300, clock=clock, park=parked)
    threads, tokens, errors = _run_together(16, cache.get)
    wait_for(lambda: parked.count == 15, timeout=30)  # all but the fetching caller
    release.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and tokens == [] and len(errors) == 16
    assert all(str(e) == "oauth down" for e in errors)
    # The failure was not cached: OAuth is back, and the next caller fetches again.
    assert cache.get() == "tok" and len(calls) == 2
    assert cache.get() == "tok" and len(calls) == 2


def test_a_waiter_gives_up_after_wait_s_while_the_fetch_hangs(clock):
    entered, release = threading.Event(), threading.Event()
    calls = []

    def fetch():
        calls.append(1)
        entered.set()
        release.wait(60)
        return "tok", "3599"

    cache = TokenCache(fetch, 300, clock=clock, wait_s=0.5)
    leader = []
    thread = threading.Thread(target=lambda: leader.append(cache.get()), daemon=True)
    thread.start()
    assert entered.wait(30), "the leader never started its fetch"
    started = time.monotonic()
    with pytest.raises(TokenWaitTimeout):
        cache.get()
    waited = time.monotonic() - started
    assert 0.45 <= waited < 30  # bounded by wait_s, not by the hung fetch
    release.set()
    thread.join(30)
    assert leader == ["tok"]
    assert cache.get() == "tok" and len(calls) == 1  # the leader's token is cached


@pytest.mark.parametrize("raw, seconds", [("3599", 3599.0), (3599, 3599.0), (59.5, 59.5)])
def test_expires_in_as_string_or_number(raw, seconds):
    assert expires_in_seconds(raw) == seconds


@pytest.mark.parametrize("raw", [None, "", "soon", True, -1, 0, "1e9"])
def test_nonsense_expires_in_is_an_error(raw):
    with pytest.raises(TokenError):
        expires_in_seconds(raw)


def test_short_ttl_shorter_than_margin_is_used_for_half_its_life(clock):
    answers = [("t1", "10"), ("t2", "10")]
    cache = TokenCache(lambda: answers.pop(0), 300, clock=clock)
    assert cache.get() == "t1"
    clock.now += 4.9
    assert cache.get() == "t1"
    clock.now += 0.2
    assert cache.get() == "t2"
    assert answers == []
