"""Running a trained model on new images: the exported ONNX model and its metadata (no torch)."""
