"""A real remote device on this machine: Debian's OpenSSH server on 127.0.0.1 and a minimal Python for it.

The server runs as the current user on a free port, with its own host key, one client key, no PAM and no password
logins; the device's Python is a venv with onnxruntime and numpy only (installed with --no-deps, the versions of
this interpreter's, so memory figures compare like with like), cached under ~/.cache/edgepack. Used by
tests/test_devices.py and scripts/bench_device.py.

>>> with local_sshd(tmp_path) as server:                       # doctest: +SKIP
...     get_device(server.url)                                  # ssh://root@127.0.0.1:PORT?python=...&identity=...
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepack"


@dataclass(frozen=True)
class LocalServer:
    port: int
    user: str
    key: Path
    known_hosts: Path
    python: Path
    remote_root: Path

    @property
    def url(self) -> str:
        return (f"ssh://{self.user}@127.0.0.1:{self.port}?python={self.python}&identity={self.key}"
                f"&known_hosts={self.known_hosts}&root={self.remote_root}")


def minimal_python() -> Path:
    """A venv with only onnxruntime and numpy, at this interpreter's versions; built once (about 25 s)."""
    import numpy
    import onnxruntime

    folder = CACHE / f"device-venv-py{sys.version_info[0]}{sys.version_info[1]}-ort{onnxruntime.__version__}-" \
                     f"np{numpy.__version__}"
    python = folder / "bin" / "python"
    if python.is_file():
        return python
    building = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(building)], check=True, capture_output=True, timeout=300)
    subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    f"onnxruntime=={onnxruntime.__version__}", f"numpy=={numpy.__version__}"],
                   check=True, capture_output=True, timeout=600)
    # venvs hard-code their own path in scripts, not in the interpreter: renaming the folder keeps bin/python usable
    building.rename(folder)
    return python


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(folder: Path, port: int) -> Path:
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {folder / 'host_ed25519'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", f"PidFile {folder / 'sshd.pid'}",
        "UsePAM no", "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp",
        "LogLevel ERROR", "MaxStartups 50", ""]))
    return config


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


@contextlib.contextmanager
def local_sshd(folder: Path, *, python: Path | None = None) -> Iterator[LocalServer]:
    """Start sshd on 127.0.0.1:<free port>, wait until a login works, yield, then stop it (by its own pid)."""
    if SSHD is None:
        raise RuntimeError("sshd is not installed (apt-get install openssh-server)")
    folder.mkdir(parents=True, exist_ok=True)
    _keygen(folder / "host_ed25519")
    _keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    port = _free_port()
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(_config(folder, port))], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=open(folder / "sshd.log", "w"))  # noqa: SIM115
    server = LocalServer(port=port, user=getpass.getuser(), key=folder / "client_key",
                         known_hosts=folder / "known_hosts", python=python or minimal_python(),
                         remote_root=folder / "remote")
    try:
        _wait_for_login(server, process, folder)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for_login(server: LocalServer, process: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 20
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=accept-new",
               "-o", f"UserKnownHostsFile={server.known_hosts}", "-i", str(server.key), "-p", str(server.port),
               f"{server.user}@127.0.0.1", "true"]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with code {process.returncode}: {(folder / 'sshd.log').read_text()}")
        if subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"sshd on port {server.port} accepted no login within 20 s: {(folder / 'sshd.log').read_text()}")
