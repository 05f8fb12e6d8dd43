"""Build: a demucs checkpoint into one ONNX graph (load, export, graph passes, storage, split)."""
