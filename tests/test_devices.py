"""Remote devices for real: an OpenSSH server on 127.0.0.1 with a minimal onnxruntime + numpy venv (no edgepack,
no torch), the same fresh-process measurement there, and every way a connection can fail (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepack.cli import main
from edgepack.errors import BadInputError
from edgepack.runtime import ProbeOptions, measure
from edgepack.runtime.devices import ADBDevice, SSHDevice, get_device, parse_ssh
from tests.local_sshd import SSHD, local_sshd, minimal_python

FAST = ProbeOptions(warmup=2, runs=10, timeout_s=120)


def _model(path: Path, *, external: bool = False) -> Path:
    """z = relu(x @ W + b): x (batch, 8) float32, W 8x4 (in an external-data file when `external`)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
                     numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                        size_threshold=0)
    else:
        onnx.save(model, path)
    return path


def _feed(seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if SSHD is None:
        pytest.skip("sshd is not installed (apt-get install openssh-server; .ci/run does)")
    try:
        python = minimal_python()
    except subprocess.CalledProcessError as error:
        pytest.skip(f"could not build the device venv (pip install onnxruntime numpy): {error.stderr!r:.200}")
    with local_sshd(tmp_path_factory.mktemp("sshd"), python=python) as running:
        yield running


def test_ssh_round_trip_measures_on_the_device_and_labels_it(server, tmp_path):
    model = _model(tmp_path / "m.onnx", external=True)
    feeds = [_feed(1), _feed(2)]
    local = measure(model, latency_feed=_feed(0), evaluation_feeds=feeds, workdir=tmp_path / "local", options=FAST)
    remote_options = ProbeOptions(warmup=2, runs=10, timeout_s=120, device=server.url)
    remote = measure(model, latency_feed=_feed(0), evaluation_feeds=feeds, workdir=tmp_path / "ssh",
                     options=remote_options)
    assert (local.status, remote.status) == ("ok", "ok"), remote.error
    for mine, theirs in zip(local.outputs, remote.outputs, strict=True):
        np.testing.assert_array_equal(mine["z"], theirs["z"])  # same ORT, same kernels: bit-identical
    assert remote.coverage == local.coverage and remote.coverage["nodes_on_ep"] >= 1
    assert remote.latency_ms["runs"] == 10 and remote.memory_mb["breakdown"]["weights"] >= 0
    # same child, same wheels (other copies of the files): the runtime baseline agrees within the MiB that the
    # resident pages of the mapped onnxruntime library differ by (docs/devices.md: 8 MiB here, 12.1 MiB measured on
    # CI's machine); the weights and arena above it are the same model's, so the bound is on the baseline only
    assert abs(remote.memory_mb["baseline"] - local.memory_mb["baseline"]) < 20
    facts = get_device(server.url).facts()
    assert facts["label"] == server.url.split("?")[0] and facts["python"] and facts["onnxruntime"]
    assert facts["int8_isa"] and facts["cpu"]
    # the model and its external data went once to <root>/models/<sha256>/, the run folder was removed
    (stored,) = (server.remote_root / "models").iterdir()
    assert sorted(p.name for p in stored.iterdir()) == [".complete", "m.onnx", "m.onnx.data"]
    assert list((server.remote_root / "runs").iterdir()) == []
    before = stored.stat().st_mtime_ns
    again = measure(model, latency_feed=_feed(0), evaluation_feeds=[], workdir=tmp_path / "ssh2",
                    options=remote_options)
    assert again.status == "ok" and stored.stat().st_mtime_ns == before  # not copied a second time


def test_a_hung_remote_run_is_killed_on_the_device_after_its_timeout(server, tmp_path):
    options = ProbeOptions(warmup=0, runs=10**8, timeout_s=1, device=server.url)
    start = time.monotonic()
    result = measure(_model(tmp_path / "m.onnx"), latency_feed=_feed(0), evaluation_feeds=[], workdir=tmp_path,
                     options=options)
    assert result.status == "failed" and "did not finish within 1 s" in result.error
    assert time.monotonic() - start < 30


def test_unreachable_host_bad_key_and_missing_onnxruntime_are_one_line_each(server, tmp_path):
    closed = parse_ssh(server.url.replace(f":{server.port}", f":{_closed_port()}"))
    start = time.monotonic()
    with pytest.raises(BadInputError, match=r"cannot reach .*Connection refused.*ConnectTimeout 10 s"):
        SSHDevice(closed, label="ssh://closed").facts()
    assert time.monotonic() - start < 15
    other_key = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
    wrong = parse_ssh(server.url.replace(str(server.key), str(other_key)))
    with pytest.raises(BadInputError, match=r"authentication failed .*Permission denied.*\?identity="):
        SSHDevice(wrong, label="ssh://wrong-key").facts()
    bare = tmp_path / "bare-venv"  # a Python without onnxruntime
    subprocess.run([str(server.python), "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    lacking = parse_ssh(server.url.replace(str(server.python), str(bare / "bin" / "python")))
    with pytest.raises(BadInputError, match=r"lacks the Python package (numpy|onnxruntime); install it") as caught:
        SSHDevice(lacking, label="ssh://no-ort").facts()
    assert "-m pip install onnxruntime numpy" in str(caught.value) and "\n" not in str(caught.value)
    missing = parse_ssh(server.url.replace(str(server.python), "/nonexistent/python3"))
    with pytest.raises(BadInputError, match=r"failed \(exit 127"):
        SSHDevice(missing, label="ssh://no-python").facts()


def test_cli_validate_on_an_unreachable_device_exits_2_with_one_line(capsys, tmp_path):
    model = _model(tmp_path / "m.onnx")
    start = time.monotonic()
    code = main(["validate", str(model), "--device", f"ssh://nobody@127.0.0.1:{_closed_port()}?connect_timeout=3",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - start < 20
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot reach nobody@127.0.0.1" in lines[0] and "ConnectTimeout 3 s" in lines[0]
    assert not (tmp_path / "out" / "report.json").exists()


def test_device_specs_are_checked_and_adb_says_what_is_missing(monkeypatch):
    target = parse_ssh("ssh://me@example.invalid:2222?python=/opt/py/bin/python3&connect_timeout=4")
    assert (target.user, target.host, target.port, target.python, target.connect_timeout) == \
        ("me", "example.invalid", 2222, "/opt/py/bin/python3", 4)
    with pytest.raises(BadInputError, match="unknown option 'pyton' \\(did you mean 'python'\\?\\)"):
        get_device("ssh://me@host?pyton=python3")
    with pytest.raises(BadInputError, match="port must be a number"):
        get_device("ssh://me@host:99999")
    with pytest.raises(BadInputError, match="write local, ssh://user@host"):
        get_device("telnet://host")
    device = get_device("adb://emulator-5554?python=/data/data/com.termux/files/usr/bin/python")
    assert isinstance(device, ADBDevice) and device.serial == "emulator-5554"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BadInputError, match="`adb` is not installed here"):
        device.facts()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, never listening: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_report_rows_name_the_device(server, tmp_path, capsys):
    model = _model(tmp_path / "m.onnx")
    code = main(["validate", str(model), "--device", server.url, "--runs", "5", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    label = server.url.split("?")[0]
    assert report["device"]["label"] == label and report["device"]["hostname"]
    assert report["variants"]["model"]["providers"]["cpu"]["device"] == label
    assert label in (tmp_path / "out" / "report.md").read_text()
