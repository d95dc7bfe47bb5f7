"""The package a user installs: `pip install .` gives the `mpesa-wsgi` command, its version
from one source, the modules and data the gateway needs, and nothing of the checkout."""

import os
import subprocess
import zipfile

import config
from helpers import ROOT_DIR


def _run(installed, *args, cwd):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MPESA_", "GATEWAY_", "LOG_", "PYTHON"))}
    return subprocess.run([installed["command"], *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_installed_command_tells_its_version_from_the_one_source(installed, tmp_path):
    proc = _run(installed, "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mpesa-wsgi {config.VERSION}"
    assert installed["wheel"].name.startswith(f"mpesa_wsgi-{config.VERSION}-")


def test_the_installed_command_checks_a_configuration(installed, tmp_path):
    env = dict(MPESA_CONSUMER_KEY="ck-0123456789", MPESA_CONSUMER_SECRET="cs-0123456789",
               MPESA_SHORTCODE="174379", MPESA_PASSKEY="pk-0123456789",
               MPESA_CALLBACK_BASE_URL="https://pay.example.com/mpesa",
               GATEWAY_API_KEYS="shop:api-key-0123456789", GATEWAY_SECRET="s" * 32)
    proc = subprocess.run([installed["command"], "--check-config"], cwd=tmp_path,
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "MPESA_SHORTCODE = 174379" in proc.stdout
    assert "GATEWAY_API_KEYS = shop:********" in proc.stdout
    missing = _run(installed, "--check-config", cwd=tmp_path)
    assert missing.returncode == 2 and "MPESA_CONSUMER_KEY is required" in missing.stderr


def test_the_wheel_holds_the_gateway_and_not_the_checkout(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for module in ("mpesa_wsgi.py", "cli.py", "config.py", "token_cache.py", "validation.py",
                   "mpesa_gateway/openapi.json", "mpesa_devtools/simulator.py",
                   "mpesa_ledger/postgres.py"):
        assert module in names
    licence = [n for n in names if n.endswith("/LICENSE")]
    assert licence, "the licence travels in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]
    shipped = {n.split("/")[0] for n in names if not n.startswith("mpesa_wsgi-")}
    ours = {"mpesa_gateway", "mpesa_ledger", "mpesa_devtools", "mpesa_wsgi.py", "cli.py",
            "config.py", "token_cache.py", "validation.py"}
    assert shipped == ours
    assert os.path.exists(os.path.join(ROOT_DIR, "LICENSE"))


def pinned(name):
    """The packages a requirements file installs, following its `-r` includes."""
    names = set()
    with open(os.path.join(ROOT_DIR, name)) as f:
        for line in (line.split("#", 1)[0].strip() for line in f):
            if line.startswith("-r "):
                names |= pinned(line[3:].strip())
            elif line:
                names.add(line.split("==", 1)[0].lower())
    return names


def test_requirements_postgres_installs_on_its_own():
    """`pip install -r requirements-postgres.txt` alone gives a gateway on PostgreSQL: the
    runtime pins come with it."""
    assert {"waitress", "urllib3", "psycopg", "psycopg-pool"} <= pinned("requirements-postgres.txt")
