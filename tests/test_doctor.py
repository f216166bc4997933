"""`edgepack doctor`: the device block, and every registered EP proven by a one-node run or told why not."""

from __future__ import annotations

import json

import onnxruntime as ort

from edgepack.cli import main
from edgepack.runtime.doctor import device_block, device_lines
from edgepack.runtime.providers import PROVIDERS


def test_doctor_names_the_machine_and_checks_every_ep(capsys):
    assert main(["doctor", "--json"]) == 0
    block = json.loads(capsys.readouterr().out)
    assert block["label"] == "local" and block["onnxruntime"] == ort.__version__
    assert block["cpu"] and block["int8_isa"] and block["cores"] >= 1 and block["memory_available_mb"] > 0
    assert sorted(block["providers"]) == PROVIDERS.names()
    assert block["providers"]["cpu"] == "available" and block["providers"]["mobile-cpu"] == "available"
    assert block["providers"]["nnapi"].startswith("static analysis only")
    for name, state in block["providers"].items():
        assert state.strip() and "\n" not in state, name
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "pip install 'edgepack[gpu]'" in block["providers"]["cuda"]
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "int8 ISA:" in text and "EP cpu: available" in text and "memory:" in text


def test_the_report_block_lists_only_the_validated_eps():
    from edgepack.runtime.providers import parse_providers

    block = device_block("local", providers=parse_providers("cpu,xnnpack"), threads=2)
    assert list(block["providers"]) == ["cpu", "xnnpack"] and block["threads"] == 2
    assert any(line.startswith("CPU: ") and "int8 ISA" in line for line in device_lines(block))
