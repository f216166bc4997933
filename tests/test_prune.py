"""Pruning: shapes of pruned tensors, reload + ONNX export (smaller, runs), importances, GQA snapping,
unstructured sparsity and what it does (not) save on dense ONNX Runtime kernels, CNN channels, bad inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgepack.calibration_data import TextSample, read_samples, sample_path
from edgepack.compress.config import PruneSection
from edgepack.compress.prune import (
    IMPORTANCES,
    StructuredSpec,
    ffn_groups,
    prune_conv_channels,
    prune_transformer,
    prune_unstructured,
    snap_heads_removed,
    snap_keep,
)
from edgepack.compress.stages import calibration_batches, prune_model
from edgepack.compress.students import load_pretrained, load_tokenizer
from edgepack.errors import BadInputError
from edgepack.exporters.onnx import export_onnx
from edgepack.families import open_model
from tests.test_distill import make_encoder

SENTENCES = [TextSample(t) for t in ("The train leaves at noon.", "Whisk the eggs before adding flour to the bowl.",
                                     "How do I reset my password?", "Rain is expected tomorrow afternoon.")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [s.text for s in read_samples(sample_path())][:64]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, minilm_path):
    # hidden 64, 4 heads of 16, FFN 128: big enough that a pruned ONNX file is visibly smaller
    return make_encoder(tmp_path_factory.mktemp("enc"), minilm_path, layers=4, hidden=64, heads=4, intermediate=128)


def _export(folder, path):
    adapter = open_model(str(folder))
    feeds = list(adapter.feeds(SENTENCES, batch_size=1))
    export_onnx(adapter, path, check_feeds=feeds)  # raises unless ORT matches torch on every sample
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["sentence_embedding"], feeds[0])[0]


def test_structured_pruning_shrinks_tensors_reloads_and_exports_smaller(encoder_dir, texts, tmp_path):
    out = tmp_path / "pruned"
    metrics = prune_model(encoder_dir, out, texts=texts,
                          options=PruneSection(heads_ratio=0.5, ffn_ratio=0.5, layers=[3], importance="taylor"))
    assert metrics["structured"]["layers_kept"] == [0, 1, 2]
    assert {k: len(v) for k, v in metrics["structured"]["heads_removed"].items()} == {"0": 2, "1": 2, "2": 2}
    model = load_pretrained(out, task="sentence-embedding")  # from_pretrained rebuilds the pruned shapes
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 64
    assert {int(k): len(v) for k, v in model.config.pruned_heads.items()} == {0: 2, 1: 2, 2: 2}
    layer = model.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (32, 64)  # (2 heads x 16, hidden)
    assert layer.attention.output.dense.weight.shape == (64, 32)
    assert layer.intermediate.dense.weight.shape == (64, 64) and layer.output.dense.weight.shape == (64, 64)
    layer_params = sum(p.numel() for p in load_pretrained(encoder_dir, task="sentence-embedding").encoder.parameters())
    # 1 layer of 4 dropped, half the heads and FFN of the other 3: ~62% of the layer weights
    assert metrics["params_before"] - metrics["params_after"] > 0.6 * layer_params
    full, pruned = tmp_path / "full.onnx", tmp_path / "pruned.onnx"
    _export(encoder_dir, full)
    embedding = _export(out, pruned)
    assert embedding.shape == (1, 64) and np.isfinite(embedding).all()
    # the vocabulary table (30522 x 64) is untouched; the transformer layers lost ~3/4 of their weights
    layer_bytes = 4 * (4 * (4 * 64 * 64 + 2 * 64 * 128))
    assert full.stat().st_size - pruned.stat().st_size > 0.6 * layer_bytes


def test_hidden_width_pruning_rewrites_config_and_exports(encoder_dir, texts, tmp_path):
    model = load_pretrained(encoder_dir, task="sentence-embedding")
    batches = calibration_batches(load_tokenizer(encoder_dir), texts, count=16, batch_size=8, max_length=64)
    report = prune_transformer(model, StructuredSpec(hidden_ratio=0.5, importance="activation"), batches=batches)
    assert report.snapped["hidden"] == {"asked_ratio": 0.5, "kept": 32, "of": 64, "heads_kept": 2}
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.pruned_heads) == (32, 2, {})
    assert model.embeddings.word_embeddings.weight.shape == (30522, 32)
    assert model.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    assert model.encoder.layer[0].output.LayerNorm.weight.shape == (32,)
    from edgepack.compress.students import save_student

    save_student(model, tmp_path / "narrow", tokenizer=load_tokenizer(encoder_dir), source_dir=encoder_dir)
    assert _export(tmp_path / "narrow", tmp_path / "narrow.onnx").shape == (1, 32)


def test_every_importance_removes_a_dead_ffn_neuron_first(encoder_dir, texts):
    tokenizer = load_tokenizer(encoder_dir)
    batches = calibration_batches(tokenizer, texts, count=16, batch_size=8, max_length=64)
    for name in IMPORTANCES:
        model = load_pretrained(encoder_dir, task="sentence-embedding").eval()
        layer = model.encoder.layer[1]
        with torch.no_grad():  # neuron 5 of layer 1: no input weights, no bias -> GELU(0) = 0, contributes nothing
            layer.intermediate.dense.weight[5] = 0
            layer.intermediate.dense.bias[5] = 0
            layer.output.dense.weight[:, 5] = 0
        scores = IMPORTANCES.get(name)().scores(model, ffn_groups(model), batches=batches)
        assert [s.shape for s in scores] == [(128,)] * 4
        assert int(torch.argmin(scores[1])) == 5, name


def test_kv_groups_are_pruned_whole_on_a_gqa_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert snap_heads_removed(8, 0.3, kv_heads=2, field_name="h") == 4  # 4 query heads share each KV head
    assert snap_heads_removed(12, 0.3, field_name="h") == 4
    assert snap_keep(1536, 0.5, multiple=8) == 768 and snap_keep(100, 0.33, multiple=8) == 64
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    report = prune_transformer(model, StructuredSpec(heads_ratio=0.5, ffn_ratio=0.5))
    assert report.snapped["heads"] == {"asked_ratio": 0.5, "removed_per_layer": 4, "of": 8}
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)  # 4 q heads, 2 kv heads of 8
    assert attn.o_proj.weight.shape == (64, 32) and model.model.layers[0].mlp.gate_proj.weight.shape == (48, 64)
    model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads, reloaded.config.head_dim) == \
        (4, 2, 8)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_unstructured_sparsity_is_exact_and_saves_nothing_on_dense_onnx(encoder_dir, texts, tmp_path):
    model = load_pretrained(encoder_dir, task="sentence-embedding")
    stats = prune_unstructured(model, sparsity=0.5, scope="layer")
    assert stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    metrics = prune_model(encoder_dir, tmp_path / "sparse", texts=texts,
                          options=PruneSection(unstructured_sparsity=0.6, recovery_steps=3, recovery_batch_size=8))
    assert metrics["unstructured"]["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    # recovery distillation keeps the pruned weights at zero (their gradients are masked)
    recovered = load_pretrained(tmp_path / "sparse", task="sentence-embedding")
    weights = [m.weight for m in recovered.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01) and metrics["recovery"]["steps"] == 3
    dense = metrics["dense_onnx_effect"]
    size_with, size_without = dense["with_zeros"]["onnx_bytes"], dense["without_zeros"]["onnx_bytes"]
    assert abs(size_with - size_without) < 0.01 * size_without  # zeros are stored densely
    assert dense["with_zeros"]["probe_status"] == "ok" and "do not drop" in dense["note"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as exporters/onnx.py uses
def test_conv_channels_pruned_with_torch_pruning_reload_and_export(tmp_path):
    pytest.importorskip("torch_pruning")
    from edgepack.compress.prune import load_pruned_module, save_pruned_module

    class WideCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(32)
            self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1, stride=2)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) -> (B, 10)
            x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model, example = WideCNN().eval(), torch.randn(1, 3, 16, 16)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    report = prune_conv_channels(model, example, ratio=0.5, importance="activation", batches=batches)
    assert model.conv1.out_channels == 16 and model.bn1.num_features == 16 and model.conv2.out_channels == 32
    assert model.head.in_features == 32 and model.head.out_features == 10  # the classifier keeps its classes
    assert report["params_after"] < 0.4 * report["params_before"]
    save_pruned_module(model, report["history"], tmp_path / "cnn")
    torch.manual_seed(1)
    reloaded = load_pruned_module(WideCNN(), example, tmp_path / "cnn")  # replay the history, then safetensors
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batches[0]), model(batches[0]))
    sizes = {}
    for name, module in (("full", WideCNN().eval()), ("pruned", reloaded)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (example,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamo=False)
        sizes[name] = path.stat().st_size
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.run(None, {"pixel_values": example.numpy()})[0].shape == (1, 10)
    assert sizes["pruned"] < 0.4 * sizes["full"]


def test_bad_pruning_inputs_name_the_field_and_the_fix(encoder_dir, texts, tmp_path):
    with pytest.raises(BadInputError, match=r"prune.heads_ratio is 1.2; a ratio is the fraction removed, in \[0, 1\)"):
        PruneSection(heads_ratio=1.2)
    with pytest.raises(BadInputError, match=r"prune.unstructured_sparsity is -0.1"):
        PruneSection(unstructured_sparsity=-0.1)
    with pytest.raises(BadInputError, match=r"prune.heads_ratio=0.9 would remove all 4 heads of a layer; use at most "
                                            r"0.750"):
        prune_model(encoder_dir, tmp_path / "o", texts=texts, options=PruneSection(heads_ratio=0.9))
    with pytest.raises(BadInputError, match=r"prune.layers=\[0, 7\]: layer indices must be distinct, in 0..3"):
        prune_model(encoder_dir, tmp_path / "o", texts=texts, options=PruneSection(layers=[0, 7]))
    with pytest.raises(BadInputError, match=r"unknown pruning importance 'taylr' \(did you mean 'taylor'\?\)"):
        StructuredSpec(importance="taylr")
    with pytest.raises(BadInputError, match=r"prune.importance 'activation' needs calibration text"):
        prune_transformer(load_pretrained(encoder_dir, task="sentence-embedding"), StructuredSpec(
            ffn_ratio=0.5, importance="activation"))
