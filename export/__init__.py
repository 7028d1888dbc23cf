"""The build step: export ldm_engine models to ONNX and TensorRT (``python -m ldm_engine.export``),
and run the exported networks behind the torch modules' signatures (``runtime``).

Submodules: contracts (each network's inputs/outputs/shapes, declared once), onnx_export,
tensorrt_build, manifest (manifest.json, hashes, cache keys, atomic writes), runtime
(load_exported_components and the ONNX Runtime / TensorRT wrappers), exporter, cli.
Importing this package imports neither onnx, onnxruntime nor tensorrt.
"""


def load_exported_components(engine_dir, *, backend="onnxruntime", device="cpu"):
    """See ldm_engine.export.runtime.load_exported_components."""
    from .runtime import load_exported_components as load

    return load(engine_dir, backend=backend, device=device)


__all__ = ["load_exported_components"]
