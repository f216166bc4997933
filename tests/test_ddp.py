"""Scale-out: the same distillation under `torchrun --standalone --nproc_per_node 2` (gloo on CPU) follows the
1-process loss curve at the same global batch; the FSDP-sharded teacher path gives the same curve too.

Tolerance: |loss_2proc - loss_1proc| <= 1e-4 x mean loss at every step (measured: ~1e-7 x). The runs differ only
in float summation order (gradients all-reduced over 2 half-batches instead of one batch; every loss is a mean of
per-sample means, so micro-batches add up exactly), so a broken sampler, a missing gradient average or a wrong
micro-batch size shows up as differences of the order of the loss itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.calibration_data import read_samples, sample_path
from edgepack.compress.config import DistillSection
from edgepack.compress.stages import distill_model
from tests.test_distill import make_encoder

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # relative to the mean loss, per step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torchrun(request: Path, *, processes: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "edgepack.compress.stages", "distill", str(request)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_follow_the_one_process_loss_curve(minilm_path, tmp_path):
    teacher = make_encoder(tmp_path / "teacher", minilm_path, layers=4, dropout=0.0)
    samples = read_samples(sample_path(), pair_field="paraphrase")
    texts, pairs = [s.text for s in samples[:96]], [(s.text, s.pair) for s in samples[600:616]]
    # a randomly initialised 1-layer student: a loss well above zero, so the curves have something to follow
    options = {"student_config": {"num_hidden_layers": 1, "intermediate_size": 32}, "epochs": 2, "batch_size": 16,
               "lr": 1e-3, "losses": {"cosine": 1.0, "hidden": 1.0}, "early_stop_patience": None}
    runs = {}
    for name, extra in (("ddp", {}), ("fsdp-teacher", {"shard_teacher": True})):
        request = tmp_path / f"{name}.json"
        request.write_text(json.dumps({"teacher_dir": str(teacher), "out_dir": str(tmp_path / f"out-{name}"),
                                       "texts": texts, "eval_pairs": pairs, "options": {**options, **extra},
                                       "result": str(tmp_path / f"{name}-result.json")}))
        runs[name] = _torchrun(request, processes=2)  # both launched now; they run while we train 1 process here
    single = distill_model(teacher, tmp_path / "out-1", texts=texts, eval_pairs=pairs,
                           options=DistillSection(**options))
    reference = np.array([h["loss"] for h in single["train"]["history"]])
    assert len(reference) == 12 and single["train"]["world_size"] == 1 and single["train"]["micro_batch"] == 16
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-2000:]
        train = json.loads((tmp_path / f"{name}-result.json").read_text())["train"]
        assert (train["world_size"], train["micro_batch"]) == (2, 8)  # same global batch of 16
        curve = np.array([h["loss"] for h in train["history"]])
        assert curve.shape == reference.shape
        assert np.abs(curve - reference).max() <= TOLERANCE * reference.mean(), (name, curve, reference)
        assert train["evals"][-1]["paraphrase_mrr"] == pytest.approx(single["train"]["evals"][-1]["paraphrase_mrr"],
                                                                     abs=0.02)
    assert reference[-3:].mean() < reference[:3].mean()
