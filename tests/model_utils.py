"""Helpers shared by the model parity tests (test_unet, test_controlnet, test_vae)."""

import torch


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Non-zero random weights everywhere (incl. zero-initialised convs): weights ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scale
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def count_calls(monkeypatch, *targets) -> dict:
    """Wraps each ``(module, name)`` target's ``module.<name>`` so that its calls are counted in the
    returned dict (by name)."""
    calls = {name: 0 for _, name in targets}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module, name in targets:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return calls
