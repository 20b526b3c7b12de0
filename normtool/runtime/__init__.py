"""Running graphs: the torch executor, the ONNX emitter and ONNX Runtime sessions."""
