"""Model conversion: HF -> GGUF (llama.cpp's reference converter), quantization, ONNX."""
