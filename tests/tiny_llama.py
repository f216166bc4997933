"""A tiny Llama the tests build in seconds: a byte-level BPE tokenizer and a 2-layer GQA decoder trained on the
bundled sentences, so its perplexity and next-token choices mean something (and quantization can hurt them)."""

from __future__ import annotations

import json
from pathlib import Path

#: 4 query heads sharing 2 KV heads (GQA), head_dim 16, tied embeddings like SmolLM2
TINY_LLAMA = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def corpus() -> list[str]:
    from edgepack.calibration_data import sample_path

    rows = [json.loads(line) for line in sample_path("sentences.jsonl").read_text().splitlines()]
    return [t for row in rows for t in (row["text"], row["paraphrase"])]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="</s>")


def build_tiny_llama(folder: Path, *, steps: int = 150, seed: int = 0, **overrides) -> Path:
    """Train the tokenizer and `steps` AdamW steps of next-token loss (batch 16, 48 tokens); save an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = corpus()
    tokenizer = train_tokenizer(texts, TINY_LLAMA["vocab_size"])
    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    stream = torch.tensor(tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"])  # (N,)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(stream) - 49, (16,), generator=generator)
            batch = torch.stack([stream[s: s + 49] for s in starts])  # (16, 49)
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "GPT2Tokenizer"  # byte-level BPE, as onnxruntime-genai expects it named
    config_path.write_text(json.dumps(tok_config, indent=2))
    return folder
