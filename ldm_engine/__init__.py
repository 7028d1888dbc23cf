"""ldm_engine: fast inference for latent-diffusion image models."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing ldm_engine stays cheap and never touches the GPU.
    if name == "Engine":
        from ldm_engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "__version__"]
