"""Static INT8 post-training quantization: our streaming range calibrators feed onnxruntime.quantization's QDQ quantizer."""
