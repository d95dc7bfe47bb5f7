"""Configuration: one error naming every bad variable, secrets never echoed."""

import base64
import os
import subprocess
import sys

import pytest

import config
from config import BASE_URLS, ConfigError, load_config
from helpers import ROOT_DIR

SECRETS = {
    "MPESA_CONSUMER_KEY": "ck-very-secret-value-1",
    "MPESA_CONSUMER_SECRET": "cs-very-secret-value-2",
    "MPESA_PASSKEY": "pk-very-secret-value-3",
    "GATEWAY_API_KEYS": "api-very-secret-value-4",
    "GATEWAY_SECRET": "hmac-very-secret-value-5",
}
VALID = dict(SECRETS, MPESA_SHORTCODE="174379",
             MPESA_CALLBACK_BASE_URL="https://pay.example.com/mpesa")


def _error(env):
    with pytest.raises(ConfigError) as exc:
        load_config(env)
    return str(exc.value)


def test_valid_environment_gets_documented_defaults():
    cfg = load_config(VALID)
    assert cfg.base_url == BASE_URLS["sandbox"] == "https://sandbox.safaricom.co.ke"
    assert (cfg.connect_timeout, cfg.read_timeout) == (5.0, 15.0)
    assert (cfg.host, cfg.port, cfg.db_path) == ("127.0.0.1", 8000, "mpesa_gateway.db")
    assert (cfg.max_amount, cfg.max_body, cfg.token_margin_s) == (250_000, 16_384, 300.0)
    assert cfg.api_keys == (("default", "api-very-secret-value-4"),)


def test_one_missing_variable_is_named():
    env = dict(VALID)
    del env["MPESA_PASSKEY"]
    message = _error(env)
    assert "MPESA_PASSKEY is required" in message


def test_several_missing_variables_are_all_named_in_one_message():
    message = _error({"MPESA_SHORTCODE": "174379"})
    for name in ("MPESA_CONSUMER_KEY", "MPESA_CONSUMER_SECRET", "MPESA_PASSKEY",
                 "MPESA_CALLBACK_BASE_URL", "GATEWAY_API_KEYS", "GATEWAY_SECRET"):
        assert f"{name} is required" in message


@pytest.mark.parametrize("name, value, words", [
    ("MPESA_SHORTCODE", "12ab56", "5 to 7 digit"),
    ("MPESA_ENVIRONMENT", "staging", "sandbox, production"),
    ("MPESA_READ_TIMEOUT", "-3", "greater than 0"),
    ("MPESA_CONNECT_TIMEOUT", "soon", "number of seconds"),
    ("GATEWAY_PORT", "70000", "port number"),
    ("GATEWAY_THREADS", "0", "greater than 0"),
    ("MPESA_CALLBACK_BASE_URL", "ftp://x.example.com", "http"),
    ("MPESA_CALLBACK_BASE_URL", "https://Pay.Example.com", "lower-case"),
    ("MPESA_CALLBACK_BASE_URL", "https://pay.example.com/a b", "spaces"),
    ("MPESA_DEFAULT_REFERENCE", "THIRTEEN-CHAR", "1 to 12"),
    ("GATEWAY_API_KEYS", "short", "16 characters"),
    ("MPESA_READ_TIMOUT", "30", "not a known setting"),
    ("GATEWAY_WEBHOOK_URLS", "shop:https://shop.example:99999/e", "host name and port"),
    ("GATEWAY_WEBHOOK_URLS", f"shop:https://{'a' * 64}.example/e", "host name and port"),
    ("GATEWAY_DB", "mysql://db.example/x", "postgresql://"),
    ("GATEWAY_DB", "postgresql://db.example", "postgresql://user:password@host"),
])
def test_bad_values_are_reported_by_name(name, value, words):
    message = _error(dict(VALID, **{name: value}))
    assert name in message and words in message


def test_five_digit_shortcode_is_valid():
    assert load_config(dict(VALID, MPESA_SHORTCODE="17437")).shortcode == "17437"


def test_bad_secrets_are_named_but_never_echoed():
    env = dict(VALID, GATEWAY_API_KEYS="tiny-secret", GATEWAY_SECRET="hmac-tiny")
    message = _error(env)
    assert "GATEWAY_API_KEYS" in message and "GATEWAY_SECRET" in message
    assert "tiny-secret" not in message and "hmac-tiny" not in message


def test_several_problems_in_one_error_list_each():
    message = _error(dict(VALID, GATEWAY_PORT="x", MPESA_ENVIRONMENT="x", GATEWAY_THREADS="-1"))
    assert all(n in message for n in ("GATEWAY_PORT", "MPESA_ENVIRONMENT", "GATEWAY_THREADS"))


def test_repr_and_masked_view_hide_every_secret():
    cfg = load_config(VALID)
    for text in (repr(cfg), str(cfg), str(cfg.masked())):
        for value in SECRETS.values():
            assert value not in text
        assert base64.b64encode(b"ck-very-secret-value-1:cs-very-secret-value-2").decode() not in text
        assert "174379" in text  # not a secret


def test_production_picks_its_base_url_and_demands_https_callbacks():
    message = _error(dict(VALID, MPESA_ENVIRONMENT="production",
                          MPESA_CALLBACK_BASE_URL="http://pay.example.com"))
    assert "MPESA_CALLBACK_BASE_URL must be https:// in production" in message
    cfg = load_config(dict(VALID, MPESA_ENVIRONMENT="production"))
    assert cfg.base_url == "https://api.safaricom.co.ke"


def test_base_url_override_wins():
    cfg = load_config(dict(VALID, MPESA_BASE_URL="http://127.0.0.1:8001/"))
    assert cfg.base_url == "http://127.0.0.1:8001"


def test_oauth_header_is_derived_once():
    cfg = load_config(VALID)
    expected = base64.b64encode(b"ck-very-secret-value-1:cs-very-secret-value-2").decode()
    assert cfg.oauth_header == "Basic " + expected


def test_paybill_sends_the_shortcode_as_party_b_and_a_till_needs_its_number():
    assert load_config(VALID).party_b == "174379"
    message = _error(dict(VALID, MPESA_TRANSACTION_TYPE="CustomerBuyGoodsOnline"))
    assert "MPESA_PARTY_B is required for a till" in message
    till = load_config(dict(VALID, MPESA_TRANSACTION_TYPE="CustomerBuyGoodsOnline",
                            MPESA_PARTY_B="5123456"))
    assert (till.transaction_type, till.party_b) == ("CustomerBuyGoodsOnline", "5123456")


def test_config_is_frozen():
    cfg = load_config(VALID)
    with pytest.raises(AttributeError):
        cfg.port = 1


def _check_config(env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MPESA_", "GATEWAY_", "LOG_"))}
    return subprocess.run([sys.executable, "mpesa_wsgi.py", "--check-config"], cwd=ROOT_DIR,
                          env=dict(clean, **env), capture_output=True, text=True, timeout=30)


def test_check_config_prints_masked_settings_and_exits_zero():
    proc = _check_config(VALID)
    assert proc.returncode == 0, proc.stderr
    assert "MPESA_SHORTCODE = 174379" in proc.stdout  # the names a user sets
    assert "MPESA_CONSUMER_SECRET = ********" in proc.stdout
    assert "GATEWAY_DB = mpesa_gateway.db" in proc.stdout
    printed = {line.split(" = ", 1)[0] for line in proc.stdout.splitlines()
               if not line.startswith("#")}
    assert printed == {name for name, *_ in config.SETTINGS}
    assert "#   confirmation: https://pay.example.com/mpesa/c2b/confirmation/********" \
        in proc.stdout
    assert not any(v in proc.stdout + proc.stderr for v in SECRETS.values())


def test_check_config_reports_the_error_and_exits_non_zero():
    proc = _check_config({"MPESA_SHORTCODE": "174379", "MPESA_PASSKEY": "pk-very-secret-value-3"})
    assert proc.returncode != 0
    assert "GATEWAY_SECRET is required" in proc.stderr
    assert "pk-very-secret-value-3" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("url", [
    "postgresql://gw:s3cret-pw@db.example:5432/mpesa",
    "postgresql://gw@db.example/mpesa?sslmode=require&password=s3cret-pw",
    "postgresql:///mpesa?host=/run/postgresql&password=s3cret-pw",
])
def test_a_postgresql_password_is_masked_wherever_the_url_holds_it(url):
    cfg = load_config(dict(VALID, GATEWAY_DB=url))
    assert cfg.db_path == url  # kept exactly, for the driver
    assert "s3cret-pw" not in repr(cfg) and "s3cret-pw" not in str(cfg.masked())
    assert "s3cret-pw" in cfg.secret_values()  # so the log filter redacts it too


@pytest.mark.parametrize("url", [
    "postgresql://gateway:te/way:pw-x1@db.example:5432/mpesa",  # an unencoded / and :
    "postgresql://gateway:p@ss-x1@db.example:5432/mpesa",
    "postgresql://gateway:pa:ss-x1@db.example:5432/mpesa",
    "postgresql://gateway:pa#ss-x1@db.example:5432/mpesa",
    "postgresql://gateway:pa?ss-x1@db.example:5432/mpesa",
    "postgresql://gateway:pa ss-x1@db.example:5432/mpesa",
    "postgresql://gateway:p[a]ss-x1@db.example:5432/mpesa",  # urllib's "Invalid IPv6 URL"
    "postgresql://gateway:p%zzss-x1@db.example:5432/mpesa",  # a bad escape, quoted by libpq
    "postgresql://gateway@db.example/mpesa?password=abc&ss-x1",  # an unencoded & in a value
    "postgresql://gateway@db.example/mpesa?password=p%ZZss-x1",
    "postgresql://gateway:pw@db.example:port/mpesa",
])
def test_a_postgresql_url_that_reads_two_ways_is_refused_without_echoing_it(url):
    message = _error(dict(VALID, GATEWAY_DB=url))
    assert message.count("GATEWAY_DB") == 1 and "percent-encoded" in message
    assert "ss-x1" not in message and "db.example" not in message
    proc = _check_config(dict(VALID, GATEWAY_DB=url))
    assert proc.returncode == 2 and "ss-x1" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url, shown", [
    ("postgresql://gw:pw@h1:5432,h2:5432/mpesa", "postgresql://gw:********@h1:5432,h2:5432/mpesa"),
    ("postgresql:///mpesa?host=/run/postgresql&password=pw",
     "postgresql:///mpesa?host=/run/postgresql&password=********"),
    ("postgresql://gw@[::1]:5432/mpesa?sslmode=require&sslpassword=pw",
     "postgresql://gw@[::1]:5432/mpesa?sslmode=require&sslpassword=********"),
    ("postgresql://db.example/mpesa?user=gw&PASSWORD=pw",  # libpq refuses it; masked anyway
     "postgresql://db.example/mpesa?user=gw&PASSWORD=********"),
])
def test_the_forms_libpq_takes_are_accepted_and_shown_masked(url, shown):
    cfg = load_config(dict(VALID, GATEWAY_DB=url))
    assert cfg.by_variable()["GATEWAY_DB"] == shown and "pw" in cfg.secret_values()


def test_check_config_prints_values_a_user_can_set_again():
    """Each line is VARIABLE = value in the variable's own form (on/off, empty for none):
    fed back, every one that is not masked loads to the same setting."""
    proc = _check_config(dict(VALID, GATEWAY_TRUSTED_PROXY="127.0.0.1", GATEWAY_RECONCILE="off"))
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split(" = ", 1) for line in proc.stdout.splitlines()
                   if not line.startswith("#"))
    assert printed["GATEWAY_RECONCILE"] == "off" and printed["GATEWAY_WEBHOOK_SENDER"] == "on"
    assert printed["GATEWAY_ADMIN_KEYS"] == "" and printed["GATEWAY_CPU_AFFINITY"] == ""
    again = dict(SECRETS, **{k: v for k, v in printed.items() if config.MASK not in v})
    assert load_config(again).by_variable() == printed


def test_a_percent_encoded_password_is_accepted_and_masked_in_both_spellings():
    url = "postgresql://gateway:te%2Fway%3Apw%40x@db.example:5432/mpesa"
    cfg = load_config(dict(VALID, GATEWAY_DB=url))
    assert cfg.db_path == url  # libpq decodes it
    assert cfg.masked()["db_path"] == "postgresql://gateway:********@db.example:5432/mpesa"
    assert {"te%2Fway%3Apw%40x", "te/way:pw@x"} <= set(cfg.secret_values())


@pytest.mark.parametrize("typo, meant", [
    ("MPESA_READ_TIMOUT", "MPESA_READ_TIMEOUT"),
    ("GATEWAY_SECERT", "GATEWAY_SECRET"),
    ("GATEWAY_API_KEY", "GATEWAY_API_KEYS"),
    ("MPESA_ENV", "MPESA_ENVIRONMENT"),  # names carried over from other tools
    ("GATEWAY_DATABASE", "GATEWAY_DB"),
])
def test_a_misspelt_setting_is_refused_with_the_one_it_probably_meant(typo, meant):
    assert f"{typo} is not a known setting (did you mean {meant}?)" in _error(
        dict(VALID, **{typo: "30"}))


def test_a_near_miss_outside_our_prefixes_is_a_hint_not_an_error():
    proc = _check_config(dict(VALID, GATWAY_THREADS="8", GATEWAY_LOG="x"))
    assert "GATWAY_THREADS is not a setting (did you mean GATEWAY_THREADS?)" in proc.stderr
    assert "GATEWAY_LOG is not a known setting" in proc.stderr  # ours, and no near miss
    assert "did you mean" not in proc.stderr.split("GATEWAY_LOG", 1)[1].splitlines()[0]
    ok = _check_config(dict(VALID, GATWAY_THREADS="8", gateway_port="9000", DATABASE_URL="x"))
    assert ok.returncode == 0 and "note: GATWAY_THREADS" in ok.stderr
    assert "gateway_port is not a setting (did you mean GATEWAY_PORT?)" in ok.stderr
    assert "DATABASE_URL is not a setting (did you mean GATEWAY_DB?)" in ok.stderr


@pytest.mark.parametrize("value", ["host=db.example user=gw password=pw-x1 dbname=mpesa",
                                   "gw:pw-x1@db.example/mpesa"])
def test_a_postgresql_connection_string_is_not_taken_for_a_sqlite_path(value):
    message = _error(dict(VALID, GATEWAY_DB=value))
    assert "postgresql://user:password@host:port/database" in message
    assert "pw-x1" not in message and "db.example" not in message

@pytest.mark.parametrize("parse, raw, expected", [
    # API keys: cut at the first colon; a key may look like a URL
    (config.named_keys, "shop://K" + "a" * 20, (("shop", "//K" + "a" * 20),)),
    (config.named_keys, "k" * 20 + ", ,shop:" + "s" * 20, (("default", "k" * 20),
                                                          ("shop", "s" * 20))),
    # webhook secrets: cut at the last colon; an empty name is default
    (config.webhook_secrets, ":whsec_" + "A" * 32, (("default", "whsec_" + "A" * 32),)),
    (config.webhook_secrets, " a : whsec_" + "A" * 32, ValueError),
    # webhook URLs: a bare URL is default's; the scheme's colon is no name's
    (config.owner_urls, "https://e.example/h?x=1:2", (("default", "https://e.example/h?x=1:2"),)),
    (config.owner_urls, "shop:http://127.0.0.1:8080/e", (("shop", "http://127.0.0.1:8080/e"),)),
    (config.owner_urls, "HTTPS://host/x", ValueError),
    (config.owner_urls, "host", ValueError),
])
def test_each_name_value_list_cuts_its_items_by_its_own_rule(parse, raw, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            parse(raw)
    else:
        assert parse(raw) == expected


@pytest.mark.parametrize("name, raw, allowed", [
    ("GATEWAY_MAX_BODY", "99999999999999999999", "from 1 to 10_485_760"),
    ("GATEWAY_THREADS", "100000", "from 1 to 1_024"),
    ("MPESA_READ_TIMEOUT", "1e9", "more than 0 and at most 120"),
    ("GATEWAY_PHONE_LOCK_S", "86400", "from 0 to 3_600"),
    ("GATEWAY_RATE", "1e-320", "from 0.001 to 1_000_000"),  # its Retry-After would overflow
    ("MPESA_RECONCILE_QPS", "1e-300", "from 0.001 to 100"),
    ("GATEWAY_CPU_AFFINITY", "99999999999999999999", "a CPU number (0 to 4095) or auto"),
    ("GATEWAY_CPU_AFFINITY", "\u00b2", "a CPU number (0 to 4095) or auto"),
])
def test_an_absurd_setting_is_refused_at_start_up_with_the_allowed_range(name, raw, allowed):
    with pytest.raises(ConfigError) as err:
        load_config({**VALID, name: raw})
    assert f"{name} must be {allowed}" in str(err.value)
    assert raw not in str(err.value)



def test_an_account_prefix_owner_must_be_a_key_s_name():
    message = _error(dict(VALID, GATEWAY_C2B_ACCOUNT_PREFIXES="shpo:INV"))
    assert "GATEWAY_C2B_ACCOUNT_PREFIXES names shpo, which no key of GATEWAY_API_KEYS has" \
        in message
