"""Stage timing without host-device synchronisation inside the denoising loop.

On CUDA a mark is a recorded event (read only after the final synchronisation); on other devices
work is synchronous, so a mark is time.perf_counter().
"""

from __future__ import annotations

import time

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # the engine's device's stream, not the current device's (they differ for cuda:1)
        self.stream = torch.cuda.current_stream(device) if self.cuda else None

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            return event
        return time.perf_counter()

    def wait(self, mark) -> None:
        """Blocks until ``mark`` has happened (once, after all work is queued)."""
        if self.cuda:
            mark.synchronize()

    def ms(self, start, end) -> float:
        if self.cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0
