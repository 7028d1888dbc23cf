"""Never return a NaN / Inf image silently.

A VAE decoder in fp16 (or bf16) can overflow -- the SDXL VAE does in fp16, which is why diffusers
upcasts it -- and an image with NaN in it becomes black after post-processing. ``checked_decode``
looks at the decoded batch once, after the denoising loop (one host sync where the pipeline syncs
anyway to post-process; none per step). If it holds NaN / Inf and the decoder ran in a half type,
the latents are decoded again by an fp32 copy of the VAE (made once per VAE and kept), with one
warning per VAE; if the latents themselves or the fp32 decode are non-finite too, a
``NonFiniteOutputError`` names the stage that produced them.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref

import torch

from ldm_engine.errors import NonFiniteOutputError

_fp32_vaes: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()
_warned: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_lock = threading.Lock()


def _all_finite(t: torch.Tensor) -> bool:
    # meta tensors (the tests that run the pipeline without data to prove it never syncs) have no values
    return t.is_meta or bool(torch.isfinite(t).all())


def fp32_copy(vae: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of ``vae`` (made once, kept while ``vae`` lives); torch.compile'd or graphed
    ``decode`` attributes are not copied: the copy decodes eagerly."""
    with _lock:
        twin = _fp32_vaes.get(vae)
        if twin is None:
            # compile() stores the compiled decode on the instance: not copied (memo maps it to None)
            compiled = vae.__dict__.get("decode")
            memo = {id(compiled): None} if compiled is not None else {}
            twin = copy.deepcopy(vae, memo).to(torch.float32)
            twin.__dict__.pop("decode", None)
            _fp32_vaes[vae] = twin
        return twin


def check_latents(latents: torch.Tensor) -> None:
    """Raise when the denoising loop's result holds NaN / Inf (output_type="latent")."""
    if not _all_finite(latents):
        raise NonFiniteOutputError(
            "the denoising loop (U-Net / ControlNet) produced NaN or Inf latents; the model's weights or the "
            "dtype may be at fault (try dtype=torch.float32)")


def checked_decode(decoded: torch.Tensor, latents: torch.Tensor, vae) -> torch.Tensor:
    """``decoded`` when it is finite; otherwise the fp32 decode of ``latents`` (see module docstring).

    latents: the VAE decoder's input (already scaled); vae: the engine's VAE module (not a graphed
    proxy: the fp32 copy is made from the module itself).
    """
    if _all_finite(decoded):
        return decoded
    check_latents(latents)
    half = decoded.dtype in (torch.float16, torch.bfloat16)
    if not half or not isinstance(vae, torch.nn.Module):
        where = "in fp32" if not half else "and this backend cannot decode again in fp32"
        raise NonFiniteOutputError(f"the VAE decoder produced NaN or Inf pixels {where}; the VAE weights may be "
                                   "corrupt")
    with _lock:
        first = vae not in _warned
        _warned.add(vae)
    if first:
        warnings.warn(f"the VAE decoder overflowed in {str(decoded.dtype).removeprefix('torch.')} (NaN / Inf "
                      "pixels); decoding again in float32. Later overflows of this VAE are fixed the same way "
                      "without a warning; load the VAE in float32 to avoid the second decode.",
                      RuntimeWarning, stacklevel=3)
    redecoded = fp32_copy(vae).decode(latents.to(torch.float32))
    if not _all_finite(redecoded):
        raise NonFiniteOutputError("the VAE decoder produced NaN or Inf pixels in float32 too (after "
                                   f"{str(decoded.dtype).removeprefix('torch.')}); the VAE weights may be corrupt")
    return redecoded
