"""Export: the ONNX graph, built directly and verified in onnxruntime."""
