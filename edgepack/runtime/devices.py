"""Where a probe child runs: this machine, a remote device over SSH, or an Android device over adb.

One protocol for all three (`probe_child.py`'s): the parent writes request.json and the feeds into a probe folder;
the device runs `python probe_child.py request.json result.json` in a fresh process; result.json and outputs.npz
come back into the same folder. A remote device needs Python with onnxruntime and numpy only: the model and the
standalone `probe_child.py` are copied there (the model once per sha256, into `<root>/models/<sha256>/`), nothing
of edgepack is installed, and the figures it sends back are labelled with the device's own facts (host name, CPU,
int8 ISA, ONNX Runtime version: `probe_child.device_facts`).

    local                                       this machine (the default)
    ssh://user@host[:port][?python=...&identity=...&known_hosts=...&connect_timeout=...&root=...]
    adb://serial[?python=...&root=...]          Android over adb push/shell (needs a Python on the device)

SSH uses the OpenSSH client (`ssh`, `scp`) with BatchMode (no password prompt can hang a run), a connect
timeout (default 10 s), keep-alives (10 s x 3) and a wall-clock limit on every command; host keys are accepted
on first contact and checked after (StrictHostKeyChecking=accept-new). An unreachable host, a failed login,
or a device whose Python lacks onnxruntime is one BadInputError (exit 2) raised before anything is measured.

What is tested here: local and SSH for real (an OpenSSH server on 127.0.0.1 with a minimal onnxruntime + numpy
venv); adb only as far as a machine without an Android device allows (docs/devices.md).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgepack.artifacts import sha256_file
from edgepack.errors import BadInputError, did_you_mean

if TYPE_CHECKING:
    from edgepack.runtime.providers import ExecutionProvider

#: The standalone child file, copied as it is to remote devices.
CHILD_FILE = Path(__file__).resolve().with_name("probe_child.py")
#: What a device's Python needs (said in the error when it lacks them).
DEVICE_PACKAGES = "onnxruntime numpy"


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message on stderr"


class Device(ABC):
    """A place to run probe children. `label` names it in every row it measured."""

    label: str = "local"

    @abstractmethod
    def facts(self) -> dict[str, Any]:
        """The device's facts (probe_child.device_facts) plus `label`; BadInputError when it cannot be reached."""

    @abstractmethod
    def run_probe(self, request: Path, result: Path, *, timeout_s: float) -> str | None:
        """Run one child on `request` (its folder holds the feeds); None when `result` (and outputs.npz beside it)
        were written, else a one-line reason."""

    def availability(self, provider: ExecutionProvider) -> str | None:
        """None when `provider` can run on this device, else why not."""
        return provider.availability()


class LocalDevice(Device):
    """This machine: `sys.executable probe_child.py` in a fresh process."""

    label = "local"

    def facts(self) -> dict[str, Any]:
        from edgepack.runtime.probe_child import device_facts

        return {"label": self.label, **device_facts()}

    def run_probe(self, request: Path, result: Path, *, timeout_s: float,
                  env: dict[str, str] | None = None) -> str | None:
        """`env`: extra environment variables for the child; the folder that holds `edgepack` goes first on
        PYTHONPATH, so a task child can import its module from this edgepack even uninstalled."""
        command = [sys.executable, str(CHILD_FILE), str(request), str(result)]
        root = str(CHILD_FILE.parents[2])
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(part for part in (root, child_env.get("PYTHONPATH")) if part)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=child_env,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return f"the probe process did not finish within {timeout_s:g} s and was killed"
        if done.returncode == 0 and result.is_file():
            return None
        return f"the probe process exited with code {done.returncode}: {_tail(done.stderr)}"


# ------------------------------------------------------------------------------------------------------ remote


@dataclass(frozen=True)
class _Done:
    code: int
    stdout: str
    stderr: str


class RemoteDevice(Device):
    """A device reached by shell commands and file copies; subclasses say how (ssh / adb)."""

    #: remote folder for models, runs and the probe file (relative: under the login's home directory)
    root: str
    python: str
    command_timeout_s: float = 120  # facts, mkdir, cleanup
    copy_timeout_s: float = 1800  # a model of a few hundred MB over a slow link

    def __init__(self) -> None:
        self._facts: dict[str, Any] | None = None

    # what a transport provides
    @abstractmethod
    def _shell(self, command: str, *, timeout_s: float, stdin: str | None = None) -> _Done: ...

    @abstractmethod
    def _push(self, files: list[Path], folder: str) -> None: ...

    @abstractmethod
    def _pull(self, files: list[str], folder: Path) -> None: ...

    @abstractmethod
    def _connection_problem(self, done: _Done) -> str | None:
        """A one-line reason when `done` failed because the device could not be reached or logged into."""

    # the protocol
    def facts(self) -> dict[str, Any]:
        if self._facts is None:
            # The probe file itself, read from stdin: nothing is copied before the device has said it can run it.
            done = self._shell(f"{shlex.quote(self.python)} - --facts", timeout_s=self.command_timeout_s,
                               stdin=CHILD_FILE.read_text())
            self._facts = {"label": self.label, **self._parse_facts(done)}
        return self._facts

    def _parse_facts(self, done: _Done) -> dict[str, Any]:
        problem = self._connection_problem(done)
        if problem is not None:
            raise BadInputError(f"{self.label}: {problem}")
        missing = re.search(r"edgepack-probe: missing Python package (\S+):", done.stderr)
        if missing:
            raise BadInputError(f"{self.label}: {self.python} there lacks the Python package {missing.group(1)}; "
                                f"install it there (`{self.python} -m pip install {DEVICE_PACKAGES}`) or point "
                                "?python= at a Python that has them")
        if done.code != 0:
            raise BadInputError(f"{self.label}: `{self.python} - --facts` failed (exit {done.code}: "
                                f"{_tail(done.stderr)}); give the device's Python with ?python=/path/to/python3")
        try:
            return json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise BadInputError(f"{self.label}: the probe printed no facts ({_tail(done.stdout + done.stderr)})"
                                ) from None

    def availability(self, provider: ExecutionProvider) -> str | None:
        if provider.static_only:
            return provider.availability()  # static analysis reads the model here; nothing runs on the device
        try:
            plan = provider.session_plan(cache_dir=Path("ep-cache"))
        except Exception as error:  # a plugin package missing here: the EP is not usable from here either
            return f"{provider.key}: {type(error).__name__}: {error}"
        if plan.plugin is not None:
            return (f"{provider.key} is a plugin EP ({Path(plan.plugin.library_path).name}); edgepack runs plugin "
                    f"EPs on the local host only, not on {self.label}")
        facts = self.facts()
        missing = [name for name in provider.required if name not in facts["ort_providers"]]
        if missing:
            return (f"{' and '.join(missing)} not in onnxruntime {facts['onnxruntime']} on {self.label} "
                    f"({facts['hostname']})")
        return None

    def run_probe(self, request: Path, result: Path, *, timeout_s: float) -> str | None:
        self.facts()  # fails with one line before anything is copied
        payload = json.loads(request.read_text())
        model_dir = self._ensure_model(Path(payload["model"]))
        run = f"{self.root}/runs/{uuid.uuid4().hex[:12]}"
        remote_request = request.with_name("request.remote.json")
        payload["model"] = f"../../models/{model_dir}/{Path(payload['model']).name}"
        remote_request.write_text(json.dumps(payload, indent=1))
        try:
            self._checked(f"mkdir -p {shlex.quote(run)}")
            files = [remote_request, *(request.parent / payload[k] for k in ("latency_feed", "evaluation_feeds"))]
            self._push([*files, CHILD_FILE], run)
            done = self._shell(self._probe_command(run, timeout_s), timeout_s=timeout_s + 60)
            if done.code in (124, 137) or done.code < 0:
                return f"the probe process on {self.label} did not finish within {timeout_s:g} s and was killed"
            problem = self._connection_problem(done)
            if problem is not None:
                return f"{self.label}: {problem}"
            if done.code != 0:
                return f"the probe process on {self.label} exited with code {done.code}: {_tail(done.stderr)}"
            self._pull([f"{run}/result.json", f"{run}/outputs.npz"], result.parent)
            return None if result.is_file() else f"{self.label}: the probe wrote no result.json"
        finally:
            self._shell(f"rm -rf {shlex.quote(run)}", timeout_s=self.command_timeout_s)
            remote_request.unlink(missing_ok=True)

    def _probe_command(self, run: str, timeout_s: float) -> str:
        """The child, killed on the device itself after `timeout_s` (coreutils / toybox `timeout`, where there is
        one), so a hung run does not outlive its connection; the local limit is a minute longer."""
        child = f"{shlex.quote(self.python)} probe_child.py request.remote.json result.json"
        limit = max(1, math.ceil(timeout_s))
        return (f"cd {shlex.quote(run)} && if command -v timeout >/dev/null 2>&1; then exec timeout -k 5 {limit} "
                f"{child}; else exec {child}; fi")

    def _checked(self, command: str) -> _Done:
        done = self._shell(command, timeout_s=self.command_timeout_s)
        if done.code != 0:
            problem = self._connection_problem(done) or f"`{command}` failed: {_tail(done.stderr)}"
            raise BadInputError(f"{self.label}: {problem}")
        return done

    def _ensure_model(self, model: Path) -> str:
        """Copy `model` and the external-data files it names to `<root>/models/<sha256>/` unless already there."""
        digest = sha256_file(model)
        folder = f"{self.root}/models/{digest}"
        marker = f"{folder}/.complete"
        have = self._shell(f"test -f {shlex.quote(marker)} && echo have || echo need",
                           timeout_s=self.command_timeout_s)
        if have.stdout.strip().endswith("have"):
            return digest
        files = [model, *model_companions(model)]
        from edgepack.reporter import get_reporter

        size_mb = sum(path.stat().st_size for path in files) / 1e6
        get_reporter().info(f"- copying {model.name} ({size_mb:.1f} MB) to {self.label} (once per model)")
        self._checked(f"mkdir -p {shlex.quote(folder)}")
        self._push(files, folder)
        self._checked(f"touch {shlex.quote(marker)}")
        return digest


def model_companions(model: Path) -> list[Path]:
    """Files a model needs beside it: ONNX external-data files (by their `location`), none for an .ort file."""
    if model.suffix.lower() != ".onnx":
        return []
    import onnx

    names: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                names.update(entry.value for entry in tensor.external_data if entry.key == "location")
        for node in graph.node:
            for attribute in node.attribute:
                for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                    visit(sub)

    visit(onnx.load(str(model), load_external_data=False).graph)
    return [model.parent / name for name in sorted(names)]


# --------------------------------------------------------------------------------------------------------- ssh


@dataclass(frozen=True)
class SSHTarget:
    """ssh://user@host[:port]?python=...&identity=...&known_hosts=...&connect_timeout=...&root=..."""

    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"
    identity: str | None = None  # private key file (default: ssh's own: ~/.ssh/config, agent, id_*)
    known_hosts: str | None = None  # UserKnownHostsFile (default ~/.ssh/known_hosts)
    connect_timeout: int = 10
    root: str = ".cache/edgepack-probe"


_SSH_KEYS = ("python", "identity", "known_hosts", "connect_timeout", "root")
_ADB_KEYS = ("python", "root")


def _query(text: str, query: str, known: tuple[str, ...]) -> dict[str, str]:
    values = {key: items[-1] for key, items in parse_qs(query, keep_blank_values=True).items()}
    for key in values:
        if key not in known:
            raise BadInputError(f"--device {text}: unknown option '{key}'{did_you_mean(key, known)}; it takes "
                                f"{', '.join(known)}")
    return values


def parse_ssh(text: str) -> SSHTarget:
    parts = urlsplit(text)
    if not parts.hostname:
        raise BadInputError(f"--device {text}: no host; write ssh://user@host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise BadInputError(f"--device {text}: the port must be a number from 1 to 65535") from None
    options: dict[str, Any] = _query(text, parts.query, _SSH_KEYS)
    if "connect_timeout" in options:
        if not options["connect_timeout"].isdigit() or int(options["connect_timeout"]) < 1:
            raise BadInputError(f"--device {text}: connect_timeout must be whole seconds >= 1")
        options["connect_timeout"] = int(options["connect_timeout"])
    return SSHTarget(host=parts.hostname, user=unquote(parts.username) if parts.username else None, port=port,
                     **options)


class SSHDevice(RemoteDevice):
    def __init__(self, target: SSHTarget, label: str) -> None:
        super().__init__()
        self.target, self.label = target, label
        self.python, self.root = target.python, target.root
        self.keepalive_s = 10

    def _options(self) -> list[str]:
        t = self.target
        options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={t.connect_timeout}",
                   "-o", f"ServerAliveInterval={self.keepalive_s}", "-o", "ServerAliveCountMax=3",
                   "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR"]
        if t.identity:
            options += ["-i", t.identity, "-o", "IdentitiesOnly=yes"]
        if t.known_hosts:
            options += ["-o", f"UserKnownHostsFile={t.known_hosts}"]
        return options

    @property
    def _login(self) -> str:
        return f"{self.target.user}@{self.target.host}" if self.target.user else self.target.host

    def _run(self, command: list[str], *, timeout_s: float, stdin: str | None = None) -> _Done:
        if shutil.which(command[0]) is None:
            raise BadInputError(f"--device {self.label}: `{command[0]}` is not installed here; install the OpenSSH "
                                "client (apt-get install openssh-client)")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, input=stdin,
                                  stdin=None if stdin is not None else subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return _Done(124, "", f"no answer within {timeout_s:g} s")
        return _Done(done.returncode, done.stdout, done.stderr)

    def _shell(self, command: str, *, timeout_s: float, stdin: str | None = None) -> _Done:
        port = ["-p", str(self.target.port)] if self.target.port else []
        return self._run(["ssh", *self._options(), *port, self._login, command], timeout_s=timeout_s, stdin=stdin)

    def _scp(self, sources: list[str], dest: str) -> None:
        port = ["-P", str(self.target.port)] if self.target.port else []
        done = self._run(["scp", "-q", *self._options(), *port, *sources, dest], timeout_s=self.copy_timeout_s)
        if done.code != 0:
            raise BadInputError(f"{self.label}: copying files failed ({self._connection_problem(done) or _tail(done.stderr)})")

    def _remote(self, path: str) -> str:
        host = f"[{self.target.host}]" if ":" in self.target.host else self.target.host
        login = f"{self.target.user}@{host}" if self.target.user else host
        return f"{login}:{path}"

    def _push(self, files: list[Path], folder: str) -> None:
        self._scp([str(f) for f in files], self._remote(folder + "/"))

    def _pull(self, files: list[str], folder: Path) -> None:
        # outputs.npz is missing when the child reported a failure: fetch what exists, one file at a time
        for name in files:
            probe = self._shell(f"test -f {shlex.quote(name)}", timeout_s=self.command_timeout_s)
            if probe.code == 0:
                self._scp([self._remote(name)], str(folder) + "/")

    def _connection_problem(self, done: _Done) -> str | None:
        if done.code == 124 and done.stderr.startswith("no answer within"):
            return f"{done.stderr} (ssh ConnectTimeout {self.target.connect_timeout} s)"
        if done.code != 255:  # ssh's own failures exit 255; anything else is the remote command's exit code
            return None
        text = _tail(done.stderr)
        where = f"{self._login} port {self.target.port or 22}"
        if "Permission denied" in text or "Too many authentication failures" in text:
            return (f"authentication failed for {where} ({text}); give the key with ?identity=/path/to/key or "
                    "add it to ssh-agent (no password prompts: BatchMode)")
        if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in done.stderr:
            return f"the host key of {where} does not match known_hosts ({text}); check the host, then fix known_hosts"
        if any(s in text for s in ("Connection refused", "timed out", "No route to host", "Could not resolve",
                                   "Network is unreachable", "Connection closed", "Connection reset")):
            return (f"cannot reach {where} ({text}; ConnectTimeout {self.target.connect_timeout} s); check the "
                    "host, the port and that sshd runs there")
        return f"ssh to {where} failed: {text}"


# --------------------------------------------------------------------------------------------------------- adb


class ADBDevice(RemoteDevice):
    """An Android device over `adb -s SERIAL push / shell / pull`: the same protocol, with a Python on the device
    (Termux's python with onnxruntime and numpy, given by ?python=). Untested here (no Android device)."""

    def __init__(self, serial: str, *, python: str, root: str, label: str) -> None:
        super().__init__()
        self.serial, self.python, self.root, self.label = serial, python, root, label

    def _adb(self, args: list[str], *, timeout_s: float, stdin: str | None = None) -> _Done:
        if shutil.which("adb") is None:
            raise BadInputError(f"--device {self.label}: `adb` is not installed here; install Android's platform "
                                "tools (apt-get install adb) and connect the device")
        try:
            done = subprocess.run(["adb", "-s", self.serial, *args], capture_output=True, text=True, input=stdin,
                                  stdin=None if stdin is not None else subprocess.DEVNULL, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return _Done(124, "", f"no answer within {timeout_s:g} s")
        return _Done(done.returncode, done.stdout, done.stderr)

    def _shell(self, command: str, *, timeout_s: float, stdin: str | None = None) -> _Done:
        return self._adb(["shell", command], timeout_s=timeout_s, stdin=stdin)

    def _push(self, files: list[Path], folder: str) -> None:
        done = self._adb(["push", *(str(f) for f in files), folder + "/"], timeout_s=self.copy_timeout_s)
        if done.code != 0:
            raise BadInputError(f"{self.label}: adb push failed ({_tail(done.stderr)})")

    def _pull(self, files: list[str], folder: Path) -> None:
        for name in files:
            if self._shell(f"test -f {shlex.quote(name)}", timeout_s=self.command_timeout_s).code == 0:
                self._adb(["pull", name, str(folder) + "/"], timeout_s=self.copy_timeout_s)

    def _connection_problem(self, done: _Done) -> str | None:
        text = _tail(done.stderr)
        if done.code == 124 and text.startswith("no answer within"):
            return text
        if "device" in text and any(s in text for s in ("not found", "offline", "unauthorized", "no devices")):
            return f"adb cannot use device {self.serial} ({text}); check `adb devices`"
        return None


# ------------------------------------------------------------------------------------------------------ lookup

_DEVICES: dict[str, Device] = {}


def get_device(spec: str | None) -> Device:
    """The device for `spec` ('local', 'ssh://...', 'adb://serial'), one instance per spec in this process (its
    facts are asked for once)."""
    spec = (spec or "local").strip()
    if spec not in _DEVICES:
        _DEVICES[spec] = _make_device(spec)
    return _DEVICES[spec]


def _make_device(spec: str) -> Device:
    if spec == "local":
        return LocalDevice()
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    label = spec.split("?", 1)[0]
    if scheme == "ssh":
        return SSHDevice(parse_ssh(spec), label=label)
    if scheme == "adb":
        parts = urlsplit(spec)
        if not parts.netloc:
            raise BadInputError(f"--device {spec}: no serial; write adb://SERIAL (from `adb devices`)")
        options = _query(spec, parts.query, _ADB_KEYS)
        return ADBDevice(parts.netloc, python=options.get("python", "python3"),
                         root=options.get("root", "/data/local/tmp/edgepack-probe"), label=label)
    raise BadInputError(f"--device {spec}: write local, ssh://user@host[:port] or adb://SERIAL")
