"""ONNX export of the pixel-space UNet2DModel (DDPM) and the onnxruntime backend running it."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ldm_engine import Engine  # noqa: E402
from ldm_engine.errors import InvalidInputError  # noqa: E402
from ldm_engine.export import contracts as C  # noqa: E402
from ldm_engine.export.exporter import ExportOptionError, ExportOptions, export_model  # noqa: E402
from ldm_engine.pipeline.unconditional import PixelEngine  # noqa: E402
from pixel_fixtures import TINY, save_pipeline  # noqa: E402


def test_unet_2d_contract():
    c = C.unet_2d_contract(TINY["plain"])
    assert c.input_names == ["sample", "timestep"] and c.output_names == ["out_sample"] and not c.cfg_batch
    assert c.bind({"sample": (3, 3, 8, 12), "timestep": (3,)}) == {"B": 3, "H": 8, "W": 12}
    assert c.extra["size_multiple"] == 4
    with pytest.raises(C.ContractError, match="timestep"):
        c.bind({"sample": (3, 3, 8, 12), "timestep": (2,)})


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is faster on a loaded machine
    yield
    torch.set_num_threads(threads)


def test_export_and_onnxruntime_backend_match_torch(tmp_path, one_thread):
    folder = save_pipeline("attn", tmp_path, pipeline="DDIMPipeline", seed=4)
    out = tmp_path / "onnx"
    with pytest.raises(ExportOptionError, match="components"):
        export_model(str(folder), out, ExportOptions(components=("unet", "vae_decoder"), progress=False),
                     log=lambda *_: None)
    manifest = export_model(str(folder), out, ExportOptions(verify=True, progress=False), log=lambda *_: None)
    assert manifest["family"] == "pixel" and list(manifest["networks"]) == ["unet_2d"]
    assert manifest["networks"]["unet_2d"]["verify"]["max_rel_err"] < 1e-4

    ref = Engine.from_pretrained(folder)
    ort = Engine.from_pretrained(folder, backend="onnxruntime", engine_dir=out)
    assert isinstance(ort, PixelEngine) and ort.scheduler == "ddim"
    for kw in (dict(eta=1.0, num_images_per_prompt=2), dict(height=32, width=16)):  # batch, another size
        a = ref.generate(num_inference_steps=4, seed=3, output_type="np", **kw).images
        b = ort.generate(num_inference_steps=4, seed=3, output_type="np", **kw).images
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3
    # the torch-only network options refuse the exported U-Net, and the engine keeps working
    for option in (ort.compile, ort.use_channels_last, ort.enable_cuda_graphs):
        with pytest.raises(InvalidInputError, match="needs the torch backend"):
            option()
    assert np.abs(ort.generate(num_inference_steps=4, seed=3, output_type="np").images
                  - ref.generate(num_inference_steps=4, seed=3, output_type="np").images).max() <= 1e-3
