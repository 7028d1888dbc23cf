"""The build step: export ldm_engine models to ONNX and TensorRT (``python -m ldm_engine.export``)."""
