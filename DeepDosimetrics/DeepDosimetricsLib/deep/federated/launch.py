"""Flower's deployment engine as real processes: the SuperLink and the run (``serve``: the server side), a
SuperNode per hospital (``run_site``), and a whole federation on one machine (``run_local``).

Every Flower process gets its own ``FLWR_HOME`` (a temporary folder: the app bundle is installed there, not
in ``~/.flwr``), this Python's ``bin`` first on ``PATH`` (Flower starts ``flower-superexec`` by name) and
runtime dependency installation off (the app's code is this installed library). Processes start in their
own process group and are stopped by it (SIGTERM, then SIGKILL), so no child outlives a federation.
TLS: the SuperLink takes ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, a SuperNode and the run the
CA (``--root-certificates``); node authentication: the SuperLink ``--enable-supernode-auth`` and each site's
public key registered (``flwr supernode register``), a SuperNode its EC key pair.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from DeepDosimetricsLib.deep.federated.config import FLOWER_VERSION, RunSettings
from DeepDosimetricsLib.deep.federated.site import SiteSettings
from DeepDosimetricsLib.runtime.errors import DeepDosimetricsError, InputError

#: the SuperLink's one HTTP port (SuperNodes, the run and the ServerApp) and a SuperNode's runtime port
DEFAULT_SERVER_ADDRESS = "127.0.0.1:9093"
DEFAULT_SITE_RUNTIME_PORT = 9094
CONNECTION = "deepdosimetrics"
#: a site's node is started again when it stops on its own (server not up yet, key not yet registered)
SITE_ATTEMPTS = 5
SITE_RETRY_SECONDS = 10
LOGS = "logs"


@dataclass
class Tls:
    """Certificates: ``ca`` (PEM of the authority both sides trust); the server's ``cert`` and ``key``."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    def check(self, server: bool) -> Optional[Tls]:
        """None when no certificate is given (insecure, localhost trials); InputError for a partial set."""
        given = [p for p in ((self.ca, self.cert, self.key) if server else (self.ca,)) if p]
        if not given and not (self.cert or self.key):
            return None
        needed = ("ca", "cert", "key") if server else ("ca",)
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise InputError(f"TLS needs the {' and '.join(missing)} file(s) too")
        for name in needed:
            if not Path(getattr(self, name)).is_file():
                raise InputError(f"TLS {name} file {getattr(self, name)} does not exist")
        return self


@dataclass
class NodeAuth:
    """SuperNode authentication: the server's registered public keys, or a site's key pair (EC, OpenSSH)."""

    public_keys: Sequence[str] = field(default_factory=list)  # server: one file per authorised site
    private_key: Optional[str] = None  # site (its public key is derived from it)


def require_flower() -> str:
    """The installed Flower version (InputError when absent); a different version than pinned is warned."""
    try:
        from importlib.metadata import version

        found = version("flwr")
    except Exception as error:  # noqa: BLE001 - PackageNotFoundError and friends
        raise InputError("federated training needs Flower: pip install 'deepdosimetrics[federated]' "
                         f"(flwr=={FLOWER_VERSION})") from error
    if found != FLOWER_VERSION:
        print(f"warning: Flower {found} is installed; this federation is written for {FLOWER_VERSION}",
              file=sys.stderr)
    return found


def flower_command(name: str) -> str:
    """A Flower executable of this Python (its bin folder), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    import shutil

    found = shutil.which(name)
    if not found:
        raise InputError(f"{name} not found: install Flower (pip install 'deepdosimetrics[federated]')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def child_environment(home: Path, threads: Optional[int] = None) -> dict[str, str]:
    """The environment of a Flower process: its FLWR_HOME, this Python first on PATH, this library importable."""
    import DeepDosimetricsLib

    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    library_root = str(Path(DeepDosimetricsLib.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([library_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start(command: list[str], env: dict[str, str], log_path: Optional[Path], own_group: bool = True) -> subprocess.Popen:
    """A process, its output to ``log_path`` (or inherited): in its own process group (stopped as a group),
    or with ``own_group=False`` in ours (a site's SuperNode: killing the site's group kills it too)."""
    output = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed with the process
    try:
        process = subprocess.Popen(command, env=env, stdout=output or None,
                                   stderr=subprocess.STDOUT if output else None, start_new_session=own_group)
    finally:
        if output:
            output.close()
    process.own_group = own_group  # type: ignore[attr-defined]
    return process


def stop(*processes: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the processes' groups (all at once), then SIGKILL to those left after ``grace`` seconds."""
    def alive(process: subprocess.Popen) -> bool:
        return process.poll() is None or (_grouped(process) and _group_alive(process.pid))

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        running = [p for p in processes if alive(p)]
        if not running:
            return
        for process in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if _grouped(process):
                    os.killpg(process.pid, sig)
                else:
                    process.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in running):
            time.sleep(0.1)


def _grouped(process: subprocess.Popen) -> bool:
    """Whether the process leads its own group (started by ``start``, or by a caller with a new session)."""
    return getattr(process, "own_group", True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def write_app(folder: Path, run: RunSettings) -> Path:
    """The Flower app bundle's folder: a pyproject.toml naming this library's apps and the run's settings."""
    import tomli_w

    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["setuptools>=64"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "deepdosimetrics-federated", "version": "1.0.0", "license": "BSD-3-Clause",
                    "description": "DeepDosimetrics: federated pre-training of the tile autoencoder",
                    "dependencies": [f"flwr=={FLOWER_VERSION}"]},
        "tool": {"flwr": {"app": {
            "publisher": "deepdosimetrics",
            "components": {"serverapp": "DeepDosimetricsLib.deep.federated.apps:server_app",
                           "clientapp": "DeepDosimetricsLib.deep.federated.apps:client_app"},
            "config": run.to_run_config(),
        }}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    (folder / "README.md").write_text("DeepDosimetrics federated app bundle (generated).\n", encoding="utf-8")
    return folder


def write_connection(home: Path, address: str, tls: Optional[Tls]) -> None:
    """FLWR_HOME/config.toml: the SuperLink connection ``flwr run`` uses."""
    import tomli_w

    connection: dict[str, object] = {"address": address}
    if tls is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(tls.ca).resolve())
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
                                      encoding="utf-8")


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeepDosimetricsError(f"{what} stopped at start (exit code {process.returncode}; see its log)")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise DeepDosimetricsError(f"{what} did not open {host}:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def superlink(address: str, logs: Path, tls: Optional[Tls] = None, auth: Optional[NodeAuth] = None) -> Iterator[Path]:
    """A running SuperLink (stopped on exit); yields the FLWR_HOME whose connection points at it."""
    require_flower()
    host, port = split_address(address)
    with tempfile.TemporaryDirectory(prefix="deepdosimetrics-flower-") as scratch:
        home = Path(scratch)
        command = [flower_command("flower-superlink"), "--host", host, "--port", str(port),
                   "--disable-runtime-dependency-installation"]
        command += (["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
                    if tls else ["--insecure"])
        if auth and auth.public_keys:
            command.append("--enable-supernode-auth")
        logs.mkdir(parents=True, exist_ok=True)
        process = start(command, child_environment(home), logs / "superlink.log")
        try:
            wait_for_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1", port, 60, process, "the SuperLink")
            connect = address if host not in ("0.0.0.0", "::") else f"127.0.0.1:{port}"
            write_connection(home, connect, tls)
            for key in (auth.public_keys if auth else ()):
                register_site_key(home, key)
            print(f"SuperLink ready at {address}: sites may connect", flush=True)
            yield home
        finally:
            stop(process)


def register_site_key(home: Path, public_key: str) -> None:
    """Authorise a site's public key on the SuperLink (``flwr supernode register``)."""
    if not Path(public_key).is_file():
        raise InputError(f"site public key {public_key} does not exist")
    done = subprocess.run([flower_command("flwr"), "supernode", "register", str(public_key), CONNECTION],
                          env=child_environment(home), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DeepDosimetricsError(f"registering {public_key} failed: {(done.stdout + done.stderr).strip()[-400:]}")


def submit_run(home: Path, run: RunSettings, on_line: Callable[[str], None] = print) -> dict:
    """Build the app bundle, ``flwr run --stream`` it, pass its lines on, and return the run's status
    (federation.json); DeepDosimetricsError when the run failed or left no status."""
    import json

    from DeepDosimetricsLib.deep.federated.server import STATUS

    status_path = Path(run.out) / STATUS
    with contextlib.suppress(FileNotFoundError):
        status_path.unlink()
    app = write_app(home / "app", run)
    process = subprocess.Popen([flower_command("flwr"), "run", str(app), CONNECTION, "--stream"],
                               env=child_environment(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            on_line(line.rstrip("\n"))
        process.wait()
    finally:
        stop(process, grace=2.0)
    try:
        status = json.loads(status_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise DeepDosimetricsError(f"the federation stopped without a result (flwr run exit code "
                                   f"{process.returncode}; see the lines above and {Path(run.out) / LOGS})") from None
    if status.get("status") != "finished":
        raise DeepDosimetricsError(f"the federation failed: {status.get('error', 'unknown reason')}")
    return status


def serve(run: RunSettings, address: str = DEFAULT_SERVER_ADDRESS, tls: Optional[Tls] = None,
          auth: Optional[NodeAuth] = None, on_line: Callable[[str], None] = print,
          before_run: Optional[Callable[[str], None]] = None) -> dict:
    """The server side: a SuperLink at ``address`` and the federation's run on it, until the run ends.
    ``before_run(address)`` (``run_local``: start the sites) is called once the SuperLink listens."""
    logs = Path(run.out) / LOGS
    with superlink(address, logs, tls, auth) as home:
        if before_run is not None:
            before_run(address)
        return submit_run(home, run, on_line)


def site_command(site: SiteSettings, server: str, tls: Optional[Tls], auth: Optional[NodeAuth],
                 runtime_port: int, node_config: Path) -> list[str]:
    command = [flower_command("flower-supernode"), "--superlink", server, "--host", "127.0.0.1",
               "--port", str(runtime_port), "--node-config", str(node_config)]
    command += ["--root-certificates", tls.ca] if tls else ["--insecure"]
    if auth and auth.private_key:
        command += ["--auth-supernode-private-key", auth.private_key]
    return command


def run_site(site: SiteSettings, server: str, tls: Optional[Tls] = None, auth: Optional[NodeAuth] = None,
             runtime_port: int = DEFAULT_SITE_RUNTIME_PORT, attempts: int = SITE_ATTEMPTS) -> int:
    """A hospital's SuperNode connected to ``server`` until it is stopped (Ctrl-C, SIGTERM); its exit code.
    A node the server refuses or cannot be reached by (not started yet, its key not yet registered) is
    started again, ``attempts`` times in all, ``SITE_RETRY_SECONDS`` apart."""
    import tomli_w

    require_flower()
    site.check()
    split_address(server)
    if auth and auth.private_key:
        if tls is None:
            raise InputError("node authentication needs TLS: pass --root-certificates")
        if not Path(auth.private_key).is_file():
            raise InputError(f"site {site.name}: private key {auth.private_key} does not exist")
    with tempfile.TemporaryDirectory(prefix=f"deepdosimetrics-site-{site.name}-") as scratch:
        home = Path(scratch)
        settings = site.save(home / "site.json")
        node_config = home / "node-config.toml"
        node_config.write_text(tomli_w.dumps({"settings": str(settings)}), encoding="utf-8")
        command = site_command(site, server, tls, auth, runtime_port, node_config)
        running: list[subprocess.Popen] = []

        def forward(signum, _frame) -> None:
            stop(*running, grace=5.0)
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            for attempt in range(1, max(1, attempts) + 1):
                running[:] = [start(command, child_environment(home, site.threads), None, own_group=False)]
                code = running[0].wait()
                if code <= 0 or attempt == attempts:
                    return code
                print(f"site {site.name}: the node stopped (exit code {code}: the server unreachable or refusing "
                      f"this node); trying again in {SITE_RETRY_SECONDS} s ({attempt} of {attempts})", flush=True)
                time.sleep(SITE_RETRY_SECONDS)
            return 0
        except KeyboardInterrupt:
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop(*running, grace=5.0)


def run_local(run: RunSettings, sites: dict[str, str], cache_root: Optional[str] = None,
              audit_root: Optional[str] = None, threads: Optional[int] = None, device: str = "auto",
              on_line: Callable[[str], None] = print) -> dict:
    """A whole federation on this machine: a SuperLink, one ``deepdosimetrics federated site`` process per
    site (logs in OUT/logs/site-NAME.log), the run; every process stopped at the end."""
    if len(sites) < 1:
        raise InputError("give at least one --site NAME=DIR")
    settings = []
    for name, cohort in sites.items():
        settings.append(SiteSettings(cohort=str(cohort), name=name, device=device,
                                     cache=str(Path(cache_root) / name) if cache_root else None,
                                     threads=threads or max(1, (os.cpu_count() or 1) // len(sites)),
                                     audit=str(Path(audit_root) / name) if audit_root else None).check())
    run.sites = run.sites or len(sites)
    processes: list[subprocess.Popen] = []
    logs = Path(run.out) / LOGS

    def start_sites(address: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        for site in settings:
            command = [sys.executable, "-m", "DeepDosimetricsLib.cli", "federated", "site", "--cohort", site.cohort,
                       "--name", site.name, "--server", address, "--insecure", "--device", site.device,
                       "--runtime-port", str(free_port()), "--threads", str(site.threads)]
            if site.cache:
                command += ["--cache", site.cache]
            if site.audit:
                command += ["--audit", site.audit]
            processes.append(start(command, child_environment(Path(tempfile.gettempdir()), site.threads),
                                   logs / f"site-{site.name}.log"))

    try:
        return serve(run, f"127.0.0.1:{free_port()}", on_line=on_line, before_run=start_sites)
    finally:
        stop(*processes)


__all__ = ["Tls", "NodeAuth", "serve", "run_site", "run_local", "write_app", "require_flower",
           "DEFAULT_SERVER_ADDRESS", "DEFAULT_SITE_RUNTIME_PORT"]
