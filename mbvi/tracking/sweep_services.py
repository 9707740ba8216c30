"""What ``mbvi sweep`` runs beside its trials: the Ray connection, the Ray task that runs
one trial as an ``mbvi fit`` subprocess, and the MLflow tracking server the trials log to.

Every check here fails fast and names what did not answer, so that a sweep never starts
a trial it cannot finish or record.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mbvi.errors import MbviError, TrackingError
from mbvi.tracking.uri import DEFAULT_TRACKING_URI, resolve_tracking_uri

CONNECT_TIMEOUT_S = 5.0
"""How long a Ray address or a tracking server may take to answer a first connection."""
SERVER_START_TIMEOUT_S = 120.0
WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray's setting of its workers' niceness (default 15), read when a node starts."""
_SQLITE = "sqlite:///"


class SweepError(MbviError, RuntimeError):
    """A sweep cannot start: Ray or the tracking server is missing or does not answer."""


# ---- Ray -----------------------------------------------------------------------------------
def import_ray():
    """The ``ray`` module; ``SweepError`` naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise SweepError(
            "mbvi sweep runs its trials on Ray, which is not installed: "
            'pip install -e ".[sweep]" (or pip install "ray>=2.9").'
        ) from None
    return ray


def check_address(address: str) -> None:
    """Raise ``SweepError`` naming ``address`` unless a Ray cluster answers there within
    ``CONNECT_TIMEOUT_S`` (``ray.init`` itself would retry for minutes): the port must
    accept a connection and speak gRPC, as a Ray head's GCS (and a Ray client server)
    does, since ``ray.init`` hangs on a port that answers in another protocol."""
    target = address
    if address == "auto":
        target = _auto_address()
        if target is None:
            raise SweepError(
                "--address auto: no running Ray cluster found (auto reads RAY_ADDRESS, else "
                "the cluster that `ray start --head` started on this node). Start one, or pass "
                "its address, or drop --address to run on this machine."
            )
    host, _, port = target.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(
            f"--address {address!r}: expected auto, HOST:PORT (the head's GCS address, e.g. "
            "10.0.0.5:6379) or ray://HOST:PORT."
        )
    where = address if target == address else f"{address} ({target})"
    try:
        grpc = _speaks_http2(host.strip("[]"), int(port))
    except OSError as err:
        raise SweepError(
            f"the Ray cluster at {where} does not answer ({err}; waited "
            f"{CONNECT_TIMEOUT_S:.0f} s): start it with `ray start --head` on the head node, fix "
            "--address, or drop --address to run on this machine."
        ) from None
    if not grpc:
        raise SweepError(
            f"{where} answers, but not as a Ray cluster (it does not speak gRPC, as a Ray "
            "head does): pass the head's GCS address (`ray start --head` prints it, port "
            "6379 by default), or drop --address to run on this machine."
        )


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(
    [0, 0, 0, 0x04, 0, 0, 0, 0, 0]  # an empty SETTINGS frame
)


def _speaks_http2(host: str, port: int) -> bool:
    """Whether ``host:port`` answers an HTTP/2 client preface (gRPC's transport) with a
    SETTINGS frame; OSError when it does not accept a connection or says nothing."""
    with socket.create_connection((host, port), CONNECT_TIMEOUT_S) as conn:
        conn.settimeout(CONNECT_TIMEOUT_S)
        conn.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
            head += chunk
    return len(head) == 9 and head[3] == 0x04  # the frame type of SETTINGS


def _auto_address() -> str | None:
    """The address ``ray.init(address="auto")`` would use, or None."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # no cluster file, or a Ray whose private helper moved
        return None


def connect(address: str | None, num_cpus: int | None, threads_per_trial: int) -> int:
    """``ray.init`` on this machine (``address`` None, ``num_cpus`` CPUs, default all) or
    on the cluster at ``address``; returns how many trials can run at once.  A trial
    needing more CPUs than any node has would wait forever: refused here."""
    ray = import_ray()
    if address is None:
        # Ray starts its workers at niceness 15 and a trial inherits it: beside any other
        # process on the machine a trial would get a small share of the cores and run
        # many times slower than the same `mbvi fit` typed by hand.  Trials are the work.
        os.environ.setdefault(WORKER_NICENESS_ENV, "0")
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=100 * 1024**2,  # trials return a few lines, nothing more
        )
    else:
        ray.init(address=address, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    if max(per_node, default=0) < threads_per_trial:
        ray.shutdown()
        raise SweepError(
            f"--threads_per_trial {threads_per_trial} is more than any Ray node has (CPUs per "
            f"node: {per_node}); pass at most {max(per_node, default=0)}."
        )
    return sum(c // threads_per_trial for c in per_node)


def run_trial(argv: list[str], env: dict[str, str], cwd: str, log: str) -> tuple[int, str]:
    """Ray task body: ``mbvi *argv`` in ``cwd`` with ``env`` added, output to ``log``
    (on the node that runs it); returns (exit status, the output's last lines).

    Cancelling the task interrupts the trial (SIGINT, so its run ends KILLED) and waits
    for it; a trial never outlives the Ray worker that started it."""
    mbvi = Path(sys.executable).with_name("mbvi")
    command = [str(mbvi)] if mbvi.exists() else [sys.executable, "-m", "mbvi.cli"]
    if not os.path.isdir(cwd):
        return 127, (
            f"the working directory {cwd} does not exist on node {socket.gethostname()}: every "
            "node needs the project (configs, user modules) at the same path"
        )
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command + argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_end_with_parent,
        )
        try:
            # Ray cancels a running task by raising KeyboardInterrupt in it between two
            # bytecodes, which never come while blocked in one long wait().
            while (code := proc.poll()) is None:
                time.sleep(0.2)
        except BaseException:  # the task was cancelled (KeyboardInterrupt) or the worker ends
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    lines = Path(log).read_text(errors="replace").strip().splitlines()
    return code, "\n".join(lines[-15:])


def _end_with_parent() -> None:
    """In the trial's process before exec: take SIGINT as Ctrl-C (a Ray worker blocks
    signals, and the mask survives exec: the trial would never see one), and receive it
    when the Ray worker dies (Linux), so that a worker killed by ``ray.shutdown`` leaves
    no orphan trial."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)


# ---- the tracking server ---------------------------------------------------------------------
def check_server(uri: str) -> None:
    """``TrackingError`` naming ``uri`` unless an MLflow server answers its health check."""
    if not uri.startswith(("http://", "https://")):
        raise TrackingError(
            f"--tracking_uri {uri!r} is not a tracking server: sweep trials log through an MLflow "
            "server (http://HOST:PORT), never into one store file from many processes. Pass a "
            f"server's URI, or drop the option to let the sweep serve {DEFAULT_TRACKING_URI}."
        )
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=CONNECT_TIMEOUT_S) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except (OSError, urllib.error.URLError) as err:
        reason = str(getattr(err, "reason", err))
    raise TrackingError(
        f"the MLflow tracking server {uri!r} does not answer ({reason}): start it "
        "(`mlflow server --backend-store-uri ...`), fix --tracking_uri, or drop the option to "
        f"let the sweep serve {DEFAULT_TRACKING_URI} itself."
    )


@contextmanager
def tracking(uri: str | None, log_dir: Path, host: str = "127.0.0.1", meanwhile=None):
    """The tracking URI trials log to: ``uri`` (or an http MLFLOW_TRACKING_URI) once it
    answers; else an ``mlflow server`` started here over the working directory's SQLite
    store (or MLFLOW_TRACKING_URI's), listening on ``host``, stopped on leaving.
    ``meanwhile()`` is called while the server starts (it takes seconds)."""
    store = uri or resolve_tracking_uri(None)
    if store.startswith(("http://", "https://")) or uri is not None:
        check_server(store)
        if meanwhile is not None:
            meanwhile()
        yield store
        return
    if not store.startswith(_SQLITE):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={store!r}: mbvi sweep serves an SQLite store (sqlite:///...) "
            "or logs to a tracking server (http://...); set it to one of these or pass "
            "--tracking_uri."
        )
    port = _free_port(host)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
               # where `mbvi fit` on this store puts a new experiment's artifacts
               "--default-artifact-root", str(Path.cwd() / "mlruns"), "--no-serve-artifacts",
               "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    if host != "127.0.0.1":  # trials on other nodes: served artifacts reach the head's disk
        command[command.index("--no-serve-artifacts")] = "--serve-artifacts"
        command += ["--artifacts-destination", str(Path.cwd() / "mlartifacts"),
                    "--allowed-hosts", f"{host}:{port},{host},localhost:{port}"]  # fmt: skip
    # Server-side jobs (GenAI evaluation) are never used here and start seven processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # fmt: skip
    served = f"http://{host}:{port}"
    try:
        if meanwhile is not None:
            meanwhile()
        _wait_until_up(server, served, log)
        print(f"mbvi sweep: MLflow server {served} over {store} (log: {log})", flush=True)
        yield served
    finally:
        _stop(server)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_until_up(server: subprocess.Popen, uri: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-5:])
            raise TrackingError(f"the MLflow server exited ({server.returncode}) at start:\n{tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TrackingError(f"the MLflow server at {uri} did not answer in {SERVER_START_TIMEOUT_S} s")


def _stop(server: subprocess.Popen) -> None:
    """End the server and its worker processes (its own process group)."""
    if server.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
