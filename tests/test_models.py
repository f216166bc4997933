import numpy as np
import pytest

from edgepack.calibration_data import TextSample
from edgepack.errors import BadInputError
from edgepack.models import get_adapter
from edgepack.models.hf_encoder import paraphrase_retrieval


def _outputs(texts: np.ndarray, pairs: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"e": row[None]} for row in np.concatenate([texts, pairs])]


def test_paraphrase_retrieval_numbers():
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    samples = [TextSample("t", "p")] * 3
    perfect = paraphrase_retrieval(_outputs(texts, texts), samples, output="e")
    assert perfect["paraphrase_recall_at_1"] == 1.0 and perfect["paraphrase_mrr"] == 1.0
    # margin of text 0: cos 1 to its pair, best other cos(e0, e0+e1) = 0.7071
    assert perfect["paraphrase_margin"] == pytest.approx(np.mean([1 - 0.70710678, 1 - 0.70710678, 1 - 0.70710678]))
    swapped = paraphrase_retrieval(_outputs(texts, texts[[1, 0, 2]]), samples, output="e")
    assert swapped["paraphrase_recall_at_1"] == pytest.approx(1 / 3)
    assert swapped["paraphrase_margin"] < 0


def test_no_pairs_no_task_metric():
    texts = np.eye(2)
    assert paraphrase_retrieval([{"e": r[None]} for r in texts], [TextSample("a"), TextSample("b")], output="e") == {}


def test_hf_encoder_reads_the_sentence_transformers_head(tiny_bert_dir):
    adapter = get_adapter("hf-encoder", str(tiny_bert_dir))
    assert (adapter.pooling, adapter.normalize) == ("mean", True)
    assert adapter.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    feed = adapter.latency_feed([TextSample("a short sentence to repeat " * 10)], sequence_length=32)
    assert feed["input_ids"].shape == (1, 32) and feed["attention_mask"].sum() == 32


def test_unknown_adapter_lists_known():
    with pytest.raises(BadInputError, match=r"unknown model adapter 'hf-encodr' \(did you mean 'hf-encoder'\?\)"):
        get_adapter("hf-encodr", ".")
