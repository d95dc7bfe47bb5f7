"""Token cache: single flight, early refresh, careful invalidation.

OAuth calls are counted at the simulator, over a real loopback socket.
"""

import threading

import pytest

import config
import daraja
from conftest import FakeClock, base_env
from token_cache import TokenCache, TokenError, expires_in_seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(sim, tmp_path, clock):
    cfg = config.load_config(base_env(sim.url, tmp_path / "l.db"))
    c = daraja.DarajaClient(cfg, daraja.build_pool(cfg), clock=clock)
    yield c
    c.close()


def test_64_threads_on_a_cold_cache_make_one_oauth_call(client, sim):
    barrier = threading.Barrier(64)
    tokens, errors = [], []

    def worker():
        barrier.wait()
        try:
            tokens.append(client.tokens.get())
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert len(tokens) == 64 and len(set(tokens)) == 1
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

    def fetch():
        calls.append(1)
        release.wait(5)
        raise RuntimeError("oauth down")

    cache = TokenCache(fetch, 300, clock=clock)
    errors = []

    def worker():
        try:
            cache.get()
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    while not calls:
        pass
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(errors) == 16
    fetched = []
    cache._fetch = lambda: (fetched.append(1) or "tok", "3599")  # test shim: OAuth is back
    assert cache.get() == "tok" and fetched == [1]


@pytest.mark.parametrize("raw, seconds", [("3599", 3599.0), (3599, 3599.0), (59.5, 59.5)])
def test_expires_in_as_string_or_number(raw, seconds):
    assert expires_in_seconds(raw) == seconds


@pytest.mark.parametrize("raw", [None, "", "soon", True, -1, 0, "1e9"])
def test_nonsense_expires_in_is_an_error(raw):
    with pytest.raises(TokenError):
        expires_in_seconds(raw)


def test_short_ttl_shorter_than_margin_is_used_for_half_its_life(clock):
    cache = TokenCache(lambda: ("t1", "10"), 300, clock=clock)
    assert cache.get() == "t1"
    cache._fetch = lambda: ("t2", "10")  # test shim
    clock.now += 4.9
    assert cache.get() == "t1"
    clock.now += 0.2
    assert cache.get() == "t2"
