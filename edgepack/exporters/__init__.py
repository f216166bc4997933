"""Exporters: torch / Hugging Face -> ONNX (with an output check against PyTorch)."""
