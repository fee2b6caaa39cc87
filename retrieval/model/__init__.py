"""The model: which one (spec, fingerprint), the Encoder protocol with its torch and ONNX implementations,
weights lookup, token features, the BPE tokenizer, and the ONNX export."""
