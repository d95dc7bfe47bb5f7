"""A throwaway PostgreSQL cluster for the tests: Debian's `postgresql` binaries, a data
directory in a temp dir, a free port on 127.0.0.1, trust auth, torn down at the end.

Under `CI=true` a missing server is an error (`.ci/run` installs the package); locally
the tests that need it skip with the reason. `make bench` uses it too, for the ledgers
workload.
"""

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile

USER = "gateway"


def binaries():
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def missing():
    """Why no cluster can be started here, or None."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -r requirements-postgres.txt)"
    return None


class Cluster:
    def __init__(self):
        self.bin = binaries()
        self.dir = tempfile.mkdtemp(prefix="mpesa-pg-")
        self.data = os.path.join(self.dir, "data")
        with socket.socket() as probe:  # a free loopback port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._names = itertools.count(1)
        # initdb refuses to run as root: the package's postgres user owns the cluster then.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--no-instructions", "-N")
        self.start()

    def _run(self, tool, *args):
        subprocess.run([*self._as, os.path.join(self.bin, tool), *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self):
        # fsync stays on (the default): the ledger's durability is what is under test.
        self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w",
                  "-t", "60", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
                  " -c max_connections=300", "start")

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database="postgres"):
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self):
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def cpu_s(self):
        """CPU seconds used so far by the server's processes (Linux /proc)."""
        ticks, postmaster = 0, self._pid()
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, IndexError):
                continue
            if b"postgres" not in cmd:
                continue
            if int(pid) == postmaster:  # itself, and the backends that have exited
                ticks += sum(int(x) for x in fields[11:15])
            elif int(fields[1]) == postmaster:  # a backend (a connection), a worker
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def _pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def close(self):
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
