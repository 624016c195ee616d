"""A shared tracking server for a team: PostgreSQL as MLflow's backend store, artifacts proxied by the server.

`make team-server` (or `python -m pipeline.apps.teamserver --dir .team`) starts both on loopback and keeps them up
until Ctrl-C; each client then sets `MLFLOW_TRACKING_URI=http://127.0.0.1:PORT`. It uses Debian's
`postgresql` package (no container runtime): a private cluster under `DIR/postgres`, owned by the
`postgres` user when run as root (PostgreSQL refuses to run as root), and MLflow's artifacts under
`DIR/artifacts`, served through the tracking server (`--artifacts-destination`), so clients need no
access to that folder. The tests start the same two servers through this module.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DATABASE, ROLE = "mlflow", "mlflow"


class ServerError(Exception):
    """A server did not start; one line naming which and why."""


def pg_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH, under /usr/lib/postgresql/N/bin)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True) + [
            str(Path(p).resolve().parent) for p in filter(None, [shutil.which("initdb")])]:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise ServerError("PostgreSQL is not installed: `make postgres` (Debian's postgresql package)")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL's programs refuse root; as root they run as the `postgres` user the package creates."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(_as_postgres(command), capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines() or ["no output"]
        raise ServerError(f"{what} failed: {detail[-1][:200]}")


class Postgres:
    """A private PostgreSQL cluster in `folder`, listening on 127.0.0.1:`port` only."""

    def __init__(self, folder: Path, port: int):
        self.data, self.port, self.bin = folder / "data", port, pg_bin()

    @property
    def uri(self) -> str:
        # initdb -A trust: any local user may connect, so this is a server for one machine's own users; the
        # README says how to expose it to a team (a proxy with authentication). The driver is named: psycopg 3.
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> "Postgres":
        """Create the cluster on first use, start it, and make the mlflow role and database."""
        fresh = not (self.data / "PG_VERSION").is_file()
        if fresh:
            self.data.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.data.parent, "postgres")
                shutil.chown(self.data, "postgres")
                if subprocess.run(_as_postgres(["test", "-w", str(self.data)])).returncode != 0:
                    raise ServerError(f"{self.data}: the postgres user cannot reach this folder (a parent folder "
                                      "is private to root); pick a folder under a world-readable path")
            _run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-instructions"], "initdb")
        # The socket goes in the cluster's folder: /var/run/postgresql may not exist or be writable.
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data}"
        _run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.data / "server.log"),
              "-w", "-t", "60", "start"], f"PostgreSQL on 127.0.0.1:{self.port} (log: {self.data / 'server.log'})")
        if fresh:
            psql = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c"]
            _run([*psql, f"CREATE ROLE {ROLE} LOGIN"], "creating the mlflow role")
            _run([*psql, f"CREATE DATABASE {DATABASE} OWNER {ROLE}"], "creating the mlflow database")
        return self

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` over `backend_uri`, serving artifacts from `artifacts`."""

    def __init__(self, backend_uri: str, artifacts: Path, port: int, log: Path):
        self.backend_uri, self.artifacts, self.port, self.log = backend_uri, artifacts, port, log
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                   "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "2"]
        with open(self.log, "ab") as log:
            # Its own process group: stopping it stops its uvicorn workers too.
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_for_health(timeout)
        except BaseException:  # its own session: Ctrl-C here would not reach it
            self.stop()
            raise
        return self

    def _wait_for_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise ServerError(f"mlflow server exited ({tail[0][:200]}); log: {self.log}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise ServerError(f"mlflow server on {self.uri} did not answer within {timeout:.0f} s; log: {self.log}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_team_server(folder: Path, port: int, pg_port: int) -> tuple[Postgres, MlflowServer]:
    """PostgreSQL and the MLflow server over it, both on loopback; stop them in reverse order."""
    folder = folder.resolve()
    postgres = Postgres(folder / "postgres", pg_port).start()
    try:
        server = MlflowServer(postgres.uri, folder / "artifacts", port, folder / "mlflow-server.log").start()
    except BaseException:
        postgres.stop()
        raise
    return postgres, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.apps.teamserver", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(".team"), help="where the database and artifacts live")
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port")
    args = parser.parse_args(argv)
    try:
        postgres, server = start_team_server(args.dir, args.port, args.pg_port)
    except ServerError as exc:
        print(f"roi: error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow on {server.uri} (PostgreSQL {postgres.uri}, artifacts in {server.artifacts})\n"
          f"on each client: export MLFLOW_TRACKING_URI={server.uri}\nCtrl-C stops both.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: stop both, as Ctrl-C does
    code = 0
    try:
        code = server.process.wait()  # returns only when mlflow server exits by itself
        if code:
            print(f"roi: error: mlflow server exited with {code}; log: {server.log}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C or SIGTERM (a launcher forwarding it, say) must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()
        postgres.stop()
    return 1 if code else 0


if __name__ == "__main__":
    sys.exit(main())
