"""The deploying docs, for real: gunicorn running the documented command line, and the
systemd unit (its install steps, what it starts, `systemd-analyze verify`).

gunicorn is a test requirement: locally the test skips without it, under CI (CI=true) it
fails. systemd-analyze is optional everywhere: without it that one test skips.
"""

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from standardwebhooks import Webhook

from helpers import API_KEY, ROOT_DIR, base_env, free_port, serve, wait_for
from mpesa_devtools.receiver import request_headers

# --- gunicorn ------------------------------------------------------------------------------

def documented_gunicorn():
    """docs/deploying.md's gunicorn section: its command line (the test changes only the
    port) and the environment it exports."""
    with open(os.path.join(ROOT_DIR, "docs", "deploying.md"), encoding="utf-8") as f:
        section = f.read().split("\n## gunicorn\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    command = next(line for line in lines if line.startswith("gunicorn "))
    exported = dict(word.split("=", 1) for line in lines if line.startswith("export ")
                    for word in line.split()[1:])
    return command, exported


GUNICORN_COMMAND, GUNICORN_ENV = documented_gunicorn()
GRACEFUL_TIMEOUT_S = 30
GUNICORN = (shutil.which("gunicorn", path=os.path.dirname(sys.executable))
            or shutil.which("gunicorn"))
WEBHOOK_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Receiver:
    """The merchant's webhook endpoint: verifies each event and keeps its type."""

    def __init__(self):
        self.types, self.lock = [], threading.Lock()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        event = Webhook(WEBHOOK_SECRET).verify(body, request_headers(environ))
        with self.lock:
            self.types.append(event["type"])
        start_response("204 No Content", [])
        return [b""]


def call(method, port, path, body=None, headers=None):
    """(status, decoded JSON or None); (None, None) while nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data[:1] == b"{" else None)
    except (OSError, http.client.HTTPException):
        return None, None
    finally:
        conn.close()


def test_gunicorn_runs_the_documented_command_and_stops_cleanly_on_sigterm(sim, tmp_path):
    if GUNICORN is None:
        if os.environ.get("CI"):
            pytest.fail("gunicorn is a test requirement (requirements-test.txt)", pytrace=False)
        pytest.skip("gunicorn is not installed (pip install -r requirements-test.txt)")
    port = free_port()
    receiver = Receiver()
    hook_server, hook_url = serve(receiver, threads=2)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MPESA_", "GATEWAY_", "LOG_"))}
    env.update(base_env(sim.url, tmp_path / "ledger.db", callback_base=f"http://127.0.0.1:{port}",
                        spool_dir=tmp_path / "spool"),
               # Every background thread runs, and each must stop: the reconciler, the
               # webhook sender, the spool replayer.
               GATEWAY_RECONCILE="on",
               GATEWAY_WEBHOOK_URLS=f"default:{hook_url}/events",
               GATEWAY_WEBHOOK_SECRETS=f"default:{WEBHOOK_SECRET}",
               GATEWAY_WEBHOOK_ALLOW_PRIVATE="on",
               XDG_RUNTIME_DIR=str(tmp_path))  # gunicorn's control socket: this test's own
    env.update(GUNICORN_ENV)  # what the docs export beside the command (GATEWAY_THREADS)
    argv = shlex.split(GUNICORN_COMMAND.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    argv[0] = GUNICORN
    out_path, err_path = tmp_path / "gunicorn.out", tmp_path / "gunicorn.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=ROOT_DIR, env=env, stdout=out, stderr=err)
    try:
        wait_for(lambda: proc.poll() is not None or call("GET", port, "/health")[0] == 200,
                 timeout=60, interval=0.1)
        assert proc.poll() is None, err_path.read_text()[-3000:]
        # A payment through gunicorn: the push, the simulator's callback back into
        # gunicorn, the merchant's webhook from the sender thread.
        status, tx = call("POST", port, "/stkpush", json.dumps({"phone": "0712345678",
                                                                "amount": 10}),
                          dict(AUTH, **{"Content-Type": "application/json"}))
        assert (status, tx["status"]) == (202, "pending"), err_path.read_text()[-3000:]
        wait_for(lambda: (call("GET", port, f"/transactions/{tx['id']}", headers=AUTH)[1]
                          or {}).get("status") == "succeeded", timeout=30, interval=0.1)
        wait_for(lambda: "payment.succeeded" in receiver.types, timeout=30, interval=0.1)

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:  # only when the test failed above
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()  # its worker sees its parent gone and exits
                proc.wait(30)
        hook_server.shutdown()
    log = err_path.read_text() + out_path.read_text()
    assert code == 0, log[-3000:]
    assert "Logging error" not in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    # The worker finished (its last line and the atexit hook's, the reconciler stopped
    # after its current query), within the graceful timeout: nothing was SIGKILLed.
    assert re.search(r"\[INFO\] Worker exiting \(pid: \d+\)", log), log[-3000:]
    assert "reconciler stopped" in log, log[-3000:]
    assert "Shutting down: Master" in log, log[-3000:]
    assert elapsed < GRACEFUL_TIMEOUT_S, f"took {elapsed:.1f} s:\n{log[-3000:]}"


# --- systemd -------------------------------------------------------------------------------

UNIT = os.path.join(ROOT_DIR, "deploy", "systemd", "mpesa-wsgi.service")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_text():
    with open(UNIT) as f:
        return f.read()


def install_steps(text):
    """The install comment's commands, in order: the `#   ` lines of the comment at the top
    of the unit, each split as a shell would (a trailing `# …` is a comment)."""
    head = text.split("\n[", 1)[0]
    return [shlex.split(line[1:], comments=True) for line in head.splitlines()
            if line.startswith("#   ")]


def unit_values(text, key):
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def position(steps, predicate, what):
    found = [n for n, argv in enumerate(steps) if predicate(argv)]
    assert found, f"the install comment has no step that {what}: {steps}"
    return found[0]


def test_the_install_steps_run_in_order_on_a_fresh_host(tmp_path):
    """Every `install` step of the comment, run in order under a scratch /etc (the clone
    being this checkout): each works, and they leave the env file the unit reads."""
    text = unit_text()
    steps = install_steps(text)
    (env_file,) = unit_values(text, "EnvironmentFile")
    env_dir = os.path.dirname(env_file)
    clone = position(steps, lambda a: a[:2] == ["git", "clone"], "clones the code")
    clone_dir = steps[clone][-1]
    made_dir = position(steps, lambda a: a[0] == "install" and "-d" in a and env_dir in a,
                        f"creates {env_dir}")
    wrote_env = position(steps, lambda a: a[0] == "install" and a[-1] == env_file,
                         f"installs {env_file}")
    reload = position(steps, lambda a: a[:2] == ["systemctl", "daemon-reload"], "reloads")
    start = position(steps, lambda a: a[:2] == ["systemctl", "enable"], "enables the unit")
    user = position(steps, lambda a: a[0] == "useradd", "adds the user")
    assert clone < made_dir < wrote_env < reload < start and user < start
    assert steps[user][-1] == unit_values(text, "User")[0] == unit_values(text, "Group")[0]

    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)  # there on any systemd host

    def here(arg):  # the host's paths, in the scratch root; the clone is this checkout
        if arg == clone_dir or arg.startswith(clone_dir + "/"):
            return ROOT_DIR + arg[len(clone_dir):]
        return str(root) + arg if arg.startswith("/etc/") else arg

    for argv in (a for a in steps if a[0] == "install"):
        done = subprocess.run([here(arg) for arg in argv], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"
    installed_dir, installed_env = root / env_dir[1:], root / env_file[1:]
    assert stat.S_IMODE(installed_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(installed_env.stat().st_mode) == 0o600  # it holds the secrets
    with open(os.path.join(ROOT_DIR, ".env.example")) as f:
        assert installed_env.read_text() == f.read()
    assert (root / "etc" / "systemd" / "system" / "mpesa-wsgi.service").read_text() == text


def test_the_unit_starts_what_the_install_steps_built():
    """ExecStart and ExecStartPre run the clone's virtual environment (the one the make
    step builds) on a script of this repository."""
    text = unit_text()
    steps = install_steps(text)
    clone_dir = steps[position(steps, lambda a: a[:2] == ["git", "clone"], "clones")][-1]
    make = steps[position(steps, lambda a: a[0] == "make" and "-C" in a, "builds the clone")]
    assert make[make.index("-C") + 1] == clone_dir
    (target,) = [a for a in make[1:] if a.endswith("/.installed")]
    venv = os.path.join(clone_dir, os.path.dirname(target))
    with open(os.path.join(ROOT_DIR, "Makefile")) as f:  # the target that builds it
        assert re.search(rf"^RUN_VENV := {re.escape(os.path.dirname(target))}$", f.read(), re.M)
    commands = [shlex.split(v) for v in unit_values(text, "ExecStart")
                + unit_values(text, "ExecStartPre")]
    assert len(commands) == 2
    for argv in commands:
        assert argv[0] == f"{venv}/bin/python"
        script = os.path.relpath(argv[1], clone_dir)
        assert not script.startswith("..") and os.path.isfile(os.path.join(ROOT_DIR, script))
    assert commands[1][2:] == ["--check-config"]


def test_the_example_env_file_suits_the_unit():
    """/etc/mpesa-wsgi/env starts as .env.example: what systemd can read (KEY=value, no
    `export`), and it sets none of the unit's own Environment= settings (it would win)."""
    with open(os.path.join(ROOT_DIR, ".env.example")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    names = set()
    for line in lines:
        assert re.match(r"[A-Za-z_][A-Za-z0-9_]*=", line), line
        names.add(line.split("=", 1)[0])
    assert names, "the example sets nothing (the required settings are uncommented)"
    own = {value.split("=", 1)[0] for value in unit_values(unit_text(), "Environment")}
    assert own >= {"GATEWAY_HOST", "GATEWAY_DB"} and not own & names, own & names


def verify_problems(text, folder):
    """What `systemd-analyze verify` says about the unit `text`, with every Exec*= binary
    replaced by one that exists here (the unit's own live in /opt on the host)."""
    folder.mkdir()
    existing = sys.executable

    def exec_line(match):
        prefix, binary_prefixes, rest = match.group(1), match.group(2), match.group(3)
        return f"{prefix}{binary_prefixes}{existing}{rest}"

    rewritten, count = re.subn(r"^(Exec\w+=)([-@:+!]*)/\S+(.*)$", exec_line, text, flags=re.M)
    assert count >= 1
    path = folder / "mpesa-wsgi.service"
    path.write_text(rewritten)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--no-pager", str(path)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SYSTEMD_LOG_COLOR="0"))
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "mpesa-wsgi.service" in line]
    if done.returncode != 0:
        problems.append(f"exit status {done.returncode}")
    return problems


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    text = unit_text()
    assert verify_problems(text, tmp_path / "shipped") == []
    # systemd only warns about an unknown key or a bad value (status 0): the check counts
    # what it says, so a broken copy is caught.
    broken = text.replace("\nRestart=on-failure", "\nRestart=on-failur")
    broken = broken.replace("\nProtectSystem=strict", "\nProtectSystm=strict")
    problems = verify_problems(broken, tmp_path / "broken")
    assert any("on-failur" in p for p in problems), problems
    assert any("ProtectSystm" in p for p in problems), problems
