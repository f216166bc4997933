"""edgepack: from a PyTorch / Hugging Face model to a small, fast, validated ONNX model for devices."""

__version__ = "0.1.0"
