"""The options both engines offer on their networks, written once: ``compile()``,
``use_channels_last()``, ``enable_cuda_graphs()`` / ``disable_cuda_graphs()``.

An engine mixes in ``NetworkOptions``, calls ``_init_network_options()`` from its __init__ and says
which networks the options touch:

- ``_torch_networks()``: its nn.Modules (the torch backend; exported wrappers make every option
  refuse) -- use_channels_last() re-lays their weights;
- ``_compile_networks(**options)``: torch.compile them in place;
- ``_graph_networks(wrap)``: the networks generate() calls with graphs on, each call wrapped by
  ``wrap(fn, owner)`` (a GraphedCallable; ``owner``: the module whose weights the graphs read).

generate() then calls the networks of ``self._graphed`` when it is set, and copies the U-Net's
output when ``self._copy_unet_output`` (compile()'s CUDA-graph modes reuse output buffers, and
samplers keep past outputs), under ``self._generate_lock()``.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from ldm_engine.errors import InvalidInputError

_COMPILE_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class NetworkOptions:
    def _init_network_options(self) -> None:
        self._copy_unet_output = False  # set by compile() in CUDA-graph modes
        self._graphed = None            # the networks replayed from CUDA graphs (_graph_networks' result)
        self._graph_options = None      # (graphs backend, max_graphs) of enable_cuda_graphs()
        self._compiled_graphs_lock = threading.Lock()  # generate() calls take turns in compile graph modes

    def _require_torch_backend(self, what: str, why: str) -> list:
        nets = self._torch_networks()
        if not all(isinstance(net, torch.nn.Module) for net in nets):
            raise InvalidInputError(f"{what} needs the torch backend ({why})")
        return nets

    def compile(self, *, mode: str | None = None, backend: str = "inductor"):
        """torch.compile the engine's networks (torch backend only; which ones: its ``_compile_networks``).

        Each network compiles as one graph (fullgraph=True: the models have no graph breaks), on the
        first generate() of each new shape. ``mode="reduce-overhead"`` adds CUDA-graph replay on GPUs.
        Returns self, so ``Engine.from_pretrained(...).compile()`` reads naturally.
        """
        self._require_torch_backend("compile()", "exported networks are already compiled")
        graph_mode = mode in _COMPILE_GRAPH_MODES
        if graph_mode and self._graph_options is not None:
            raise InvalidInputError(f"compile(mode={mode!r}) replays CUDA graphs itself; call disable_cuda_graphs() "
                                    "first, or compile with the default mode and keep enable_cuda_graphs()")
        # CUDA-graph modes reuse output buffers on the next replay; samplers keep past outputs (PLMS).
        self._copy_unet_output = graph_mode
        self._compile_networks(fullgraph=True, mode=mode, backend=backend)
        if self._graph_options is not None:  # graphs of the compiled networks from now on
            self._install_graphs(*self._graph_options)
        return self

    def use_channels_last(self, enabled: bool = True):
        """Keeps the convolution weights of the engine's networks in channels_last (NHWC) memory
        format, so their activations follow: the layout of cuDNN's tensor-core convolutions, and the
        one in which the transformer blocks' token view needs no copy. Same images either way
        (tested); whether it is faster on a GPU: ``benchmarks/bench_pipeline.py`` (variant
        ``+channels_last``). ``enabled=False`` goes back to contiguous. Returns self.
        """
        nets = self._require_torch_backend("use_channels_last()", "exported networks fix their layout")
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for net in nets:
            net.to(memory_format=fmt)  # new weight storage: CUDA graphs see it and capture again
        return self

    def use_subpixel_upsample(self, enabled: bool = True):
        """Computes each nearest-2x upsample + 3x3 conv of the engine's networks (VAE decoder, U-Net) as
        four 2x2 convolutions of the un-upsampled input, interleaved (ldm_engine.models.layers.Upsample2D):
        2.25x fewer FLOPs there and no 4x larger intermediate tensor. Same images up to rounding
        (tested). Eager calls keep the derived 2x2 weights (16/9 of those convs' weights; SD-Turbo fp16:
        18 MiB VAE, 112 MiB U-Net). Off by default: whether it is faster with cuDNN is measured by
        ``benchmarks/bench_pipeline.py`` (variants ``+subpixel``). ONNX export traces the plain path.
        ``enabled=False`` goes back. Returns self.
        """
        if not isinstance(enabled, bool):
            raise InvalidInputError(f"use_subpixel_upsample(enabled) takes True or False, got {enabled!r}")
        from ldm_engine.models.layers import set_subpixel_upsample

        for net in self._require_torch_backend("use_subpixel_upsample()", "exported networks are fixed graphs"):
            set_subpixel_upsample(net, enabled)
        if self._graph_options is not None:  # captured graphs replay the other path: capture again
            self._install_graphs(*self._graph_options)
        return self

    def enable_cuda_graphs(self, *, max_graphs: int = 8):
        """Replays every network call from a CUDA graph.

        The first generate() of each new shape (batch, size; Engine: guidance on or off, ControlNet
        scales) runs each network once to warm up, captures it and replays it; later calls with the
        same shapes only replay. ``max_graphs``: shapes kept per network (least recently used
        dropped). Works with compile() in its default mode (either order). See
        ldm_engine.pipeline.cuda_graphs. Returns self.
        """
        self._require_torch_backend("enable_cuda_graphs()", "exported networks run in their own runtimes")
        if self.device.type != "cuda":
            raise InvalidInputError(f"enable_cuda_graphs() needs a CUDA device; this engine runs on {self.device}")
        if self._copy_unet_output:
            raise InvalidInputError("this engine was compiled in a CUDA-graph mode (reduce-overhead / max-autotune), "
                                    "which already replays graphs; compile with the default mode to use both")
        from ldm_engine.pipeline.cuda_graphs import CudaGraphs

        self._install_graphs(CudaGraphs(), max_graphs)
        return self

    def disable_cuda_graphs(self):
        """Back to eager network calls; the captured graphs and their memory are released."""
        self._graphed = self._graph_options = None
        return self

    def _install_graphs(self, graphs, max_graphs: int) -> None:
        """Graphs from ``graphs`` (CudaGraphs, or the tests' CPU stand-in RerunGraphs)."""
        from ldm_engine.pipeline.cuda_graphs import GraphedCallable

        def wrap(fn, owner):
            return GraphedCallable(fn, owner, graphs, max_graphs=max_graphs)

        self._graphed = self._graph_networks(wrap)
        self._graph_options = (graphs, max_graphs)

    def _generate_lock(self):
        """What a generate() call holds: the lock of compile()'s CUDA-graph modes, else nothing."""
        return self._compiled_graphs_lock if self._copy_unet_output else contextlib.nullcontext()
