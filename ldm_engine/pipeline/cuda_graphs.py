"""CUDA-graph replay of the engine's networks (``Engine.enable_cuda_graphs()``).

Why: in eager PyTorch every kernel of a network is launched from Python -- over a thousand per
U-Net call, several hundred per text encoder and VAE decoder. At the few-step models' sizes the
GPU finishes those kernels faster than the host issues them, so latency is set by the host. A
captured graph launches the whole network at once.

How: ``GraphedCallable`` wraps one network call (a module, or a bound method such as
``vae.decode``). A call's *signature* is the pytree structure of its arguments, each tensor's
(shape, dtype, device) and every non-tensor value (a ControlNet's conditioning scale, a None
residual). The first call of a signature runs once eagerly as warm-up (lazy initialisation,
cuBLAS / cuDNN algorithm choice, Triton compilation -- none of which may happen during capture),
is then captured with its own copies of the tensor arguments as static inputs, and replayed.
Later calls copy their tensors into those static inputs and replay. Non-tensor values are baked
into the graph, which is why they are part of the signature.

Outputs are cloned after every replay: the next replay (the same network's next step, a second
ControlNet sharing a graph, a sampler keeping past outputs) would otherwise overwrite them. That
also makes it safe for all graphs of an engine to share one memory pool (run sequentially on one
stream, no graph's memory holds anything another needs between replays), so the pool is about as
large as the biggest network's activations rather than their sum. The copies are a few MB per call.

Graphs read the weights at their captured addresses: ``module.to(...)`` or reassigning parameters
after capture would leave them reading freed memory. Each wrapper therefore fingerprints its
module's first parameter and drops its graphs when it changes.

Threads: one engine may serve many threads. Each captured graph owns static input and output
tensors, and all graphs of an engine share one memory pool, so two replays must never interleave:
a graphs backend (``CudaGraphs`` / ``RerunGraphs``, one per engine) carries one re-entrant lock,
held by every wrapped call from copying its inputs in to cloning its outputs out (and around
warm-up and capture). Calls of different threads thus take turns network call by network call --
the GPU runs them one after the other anyway -- while everything between network calls (sampler
arithmetic, tokenisation, post-processing) still overlaps. ``CudaGraphs`` also orders the calls on
the GPU when threads use different streams: each call's stream waits for the previous call's work.

``RerunGraphs`` is a stand-in without CUDA that keeps the same discipline -- static inputs,
warm-up, outputs written back into the captured output tensors, clones -- by re-running the
captured call on the static inputs. The CPU tests use it to check everything but the capture
itself; the real graphs are tested on a GPU (tests marked ``cuda``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

__all__ = ["GraphedCallable", "CudaGraphs", "RerunGraphs", "Proxy"]


class CudaGraphs:
    """Captures with ``torch.cuda.CUDAGraph``; all captures of one instance share a memory pool."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.RLock()
        self._done = None  # event recorded after the last call's work (any thread's stream)

    def begin(self, device: torch.device) -> None:
        """Called under the lock before a call: its stream waits for the previous call's work."""
        if self._done is not None:
            torch.cuda.current_stream(device).wait_event(self._done)

    def end(self, device: torch.device) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._done = event

    def warm_up(self, run: Callable[[], Any], device: torch.device) -> None:
        # On a side stream, as torch.cuda.make_graphed_callables does: work queued there leaves no
        # state on the capture's stream, and the caller's stream waits for it.
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            run()
        main.wait_stream(side)

    def capture(self, run: Callable[[], Any], device: torch.device):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=self.pool):
            out = run()
        return out, graph.replay


class RerunGraphs:
    """No-CUDA stand-in: "capture" runs the call once; "replay" runs it again on the same static
    inputs and writes the results into the captured output tensors, as a graph replay would."""

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.lock = threading.RLock()

    def begin(self, device: torch.device) -> None:
        pass

    def end(self, device: torch.device) -> None:
        pass

    def warm_up(self, run: Callable[[], Any], device: torch.device) -> None:
        run()

    def capture(self, run: Callable[[], Any], device: torch.device):
        self.captures += 1
        out = run()
        out_leaves = pytree.tree_leaves(out)

        def replay():
            self.replays += 1
            for dst, src in zip(out_leaves, pytree.tree_leaves(run())):
                if dst is not None:
                    dst.copy_(src)

        return out, replay


def _leaf_signature(leaf) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        raise TypeError(f"CUDA graphs: argument of type {type(leaf).__name__} is neither a tensor nor "
                        "hashable; it cannot be part of a graph's signature") from None
    return ("value", type(leaf), leaf)


class _Entry:
    __slots__ = ("static_inputs", "outputs", "out_spec", "replay")

    def __init__(self, static_inputs, outputs, out_spec, replay):
        self.static_inputs, self.outputs, self.out_spec, self.replay = static_inputs, outputs, out_spec, replay


class GraphedCallable:
    """``fn(*args, **kwargs)`` replayed from a graph per call signature (see the module docstring).

    owner: the module whose weights ``fn`` reads (fingerprinted); max_graphs: signatures kept, least
    recently used dropped first. Attribute access falls through to ``owner`` (``.config``, ``.dtype``).
    """

    def __init__(self, fn: Callable, owner: torch.nn.Module, graphs, *, max_graphs: int = 8):
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.fn, self.owner, self.graphs, self.max_graphs = fn, owner, graphs, max_graphs
        self._entries: OrderedDict = OrderedDict()
        self._fingerprint = None
        if not hasattr(graphs, "lock"):  # a backend of one's own: give it the lock its wrappers share
            graphs.lock = threading.RLock()

    def __getattr__(self, name):
        # Only reached for names not found on the wrapper itself.
        if name in ("fn", "owner", "graphs", "max_graphs", "_entries", "_fingerprint", "_call_locked"):
            raise AttributeError(name)
        return getattr(self.owner, name)

    @property
    def num_graphs(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drops every captured graph (their memory returns to the pool)."""
        self._entries.clear()

    def _weights_fingerprint(self):
        p = next(self.owner.parameters(), None)
        return None if p is None else (p.data_ptr(), p.dtype, p.device)

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        device = next((leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
        with self.graphs.lock:  # static buffers and the shared pool: one call at a time (module docstring)
            begin, end = getattr(self.graphs, "begin", None), getattr(self.graphs, "end", None)
            if device is not None and begin is not None:
                begin(device)
            try:
                return self._call_locked(leaves, spec)
            finally:
                if device is not None and end is not None:
                    end(device)

    def _call_locked(self, leaves, spec):
        fingerprint = self._weights_fingerprint()
        if fingerprint != self._fingerprint:  # weights moved or were replaced: old graphs read freed memory
            self._entries.clear()
            self._fingerprint = fingerprint
        key = (spec, tuple(_leaf_signature(leaf) for leaf in leaves))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(key, leaves, spec)
        else:
            self._entries.move_to_end(key)
            for dst, src in zip(entry.static_inputs, leaves):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
        entry.replay()
        return pytree.tree_unflatten([None if o is None else o.clone() for o in entry.outputs], entry.out_spec)

    def _capture(self, key, leaves, spec) -> _Entry:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        device = next((t.device for t in static if isinstance(t, torch.Tensor)), None)
        if device is None:
            raise TypeError("CUDA graphs: a graphed call needs at least one tensor argument")
        args, kwargs = pytree.tree_unflatten(static, spec)

        def run():
            return self.fn(*args, **kwargs)

        # Bad input raises here, before anything is captured or cached.
        self.graphs.warm_up(run, device)
        out, replay = self.graphs.capture(run, device)
        outputs, out_spec = pytree.tree_flatten(out)
        if not all(isinstance(o, torch.Tensor) or o is None for o in outputs):  # None: a tiny VAE's logvar
            raise TypeError("CUDA graphs: a graphed call must return tensors (or tuples / lists of them)")
        entry = _Entry(static, outputs, out_spec, replay)
        self._entries[key] = entry
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        return entry


class Proxy:
    """An object with some attributes replaced (``vae`` with graphed ``encode`` / ``decode``)."""

    def __init__(self, target, **overrides):
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        if name == "_target":
            raise AttributeError(name)
        return getattr(self._target, name)
