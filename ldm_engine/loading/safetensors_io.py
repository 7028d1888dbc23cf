"""Validated reading of ``.safetensors`` files, one tensor at a time, with no second copy.

We parse the header ourselves (the format is an 8-byte little-endian header length, a JSON
header, then the raw data) so that truncated or corrupt files give a CheckpointError naming the
file instead of a crash deep in a reader.

Tensor data goes straight into its final storage: for a CPU tensor kept in the stored dtype the
bytes are read (``readinto``) directly into the freshly allocated tensor; otherwise they pass
through one reusable staging buffer (the size of the largest tensor) and are cast / moved from
there. Peak memory is the weights plus one tensor.

``io="mmap"`` instead copies out of a private memory map and drops each tensor's pages after the
copy (``MADV_DONTNEED``) so resident memory stays ~1x too. It is kept for comparison: on the
machines we measured, page-faulting through a map was 2-4x slower than plain reads (see
benchmarks/bench_loading.py). ``safetensors.safe_open`` is not used for data: its tensors are
views of a map that stays resident until the file closes, so copying out of it counts the
weights twice.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from ldm_engine.errors import CheckpointError

# safetensors dtype strings -> torch dtypes (those this torch build knows).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
_PAGE = mmap.PAGESIZE


class TensorInfo:
    """Where one tensor lies in the file: dtype, shape and absolute byte range."""

    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _parse_header(path: Path, file_size: int, head: bytes) -> tuple[dict[str, TensorInfo], dict, int]:
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file ({why}). "
                               "The file may be truncated (an interrupted download?) or corrupt; "
                               "download or convert it again.")

    if file_size < 8:
        raise corrupt(f"only {file_size} bytes long")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise corrupt(f"header length field says {header_len} bytes but the file has {file_size}")
    raw = head[8:8 + header_len]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not valid JSON: {exc}") from None
    except RecursionError:  # valid JSON nested thousands of levels deep: no real header is
        raise corrupt("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")

    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        # The format defines __metadata__ as a map of strings to strings.
        bad = (type(metadata).__name__ if not isinstance(metadata, dict) else next(
            f"{type(v).__name__} for {k!r}"[:200] for k, v in metadata.items() if not isinstance(v, str)))
        raise corrupt(f"__metadata__ must map strings to strings, got {bad}")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(_integer(s) for s in _json_list(entry["shape"]))
            begin, end = (_integer(o) for o in _json_list(entry["data_offsets"]))
        except KeyError as exc:
            if isinstance(entry, dict) and "dtype" in entry and entry["dtype"] not in _DTYPES:
                raise corrupt(f"tensor {name!r} has unsupported dtype {_short_repr(entry['dtype'])}") from None
            raise corrupt(f"tensor {name!r} entry lacks {exc}") from None
        except (TypeError, ValueError, OverflowError):
            raise corrupt(f"tensor {name!r}"[:200] + f" has a malformed entry: {_short_repr(entry)}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise corrupt(f"tensor {name!r} has a negative dimension in shape {_short_repr(list(shape))}")
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if begin < 0 or end < begin or end - begin != expected:
            raise corrupt(f"tensor {name!r} of shape {_short_repr(list(shape))} {entry['dtype']} should span "
                          f"{expected} bytes, its offsets [{begin}, {end}] disagree")
        if end > data_size:
            raise CheckpointError(
                f"{path}: the file is truncated: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has only {file_size} bytes. Download or convert it again.")
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    return tensors, metadata, data_start


def _json_list(value) -> list:
    if not isinstance(value, list):
        raise TypeError("not a list")
    return value


def _integer(value) -> int:
    """A JSON integer (the format's shapes and offsets are unsigned integers: no floats, strings
    or booleans)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not an integer")
    return value


def _short_repr(obj, limit: int = 200) -> str:
    """repr() cut to ``limit`` characters; a structure too deep to print says so instead."""
    try:
        return repr(obj)[:limit]
    except RecursionError:
        return f"<{type(obj).__name__} nested too deeply>"


class SafetensorsFile:
    """A validated ``.safetensors`` file. Use as a context manager (or call ``close()``).

    io: "read" (default; read syscalls into the final tensor) or "mmap" (copy out of a private
    memory map, releasing pages as it goes)."""

    def __init__(self, path: str | os.PathLike, *, io: str = "read"):
        if io not in ("read", "mmap"):
            raise ValueError(f"io must be 'read' or 'mmap', got {io!r}")
        self.path = Path(path)
        self.io = io
        try:
            self._fh = open(self.path, "rb", buffering=0)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except (IsADirectoryError, PermissionError) as exc:
            raise CheckpointError(f"{self.path}: cannot open: {exc}") from None
        try:
            file_size = os.fstat(self._fh.fileno()).st_size
            head = self._read_exact(0, min(8, file_size))
            if len(head) == 8:
                header_len = struct.unpack("<Q", head)[0]
                if header_len <= _MAX_HEADER_BYTES and 8 + header_len <= file_size:
                    head += self._read_exact(8, header_len)
            self.tensors, self.metadata, _ = _parse_header(self.path, file_size, head)
            self._file_size = file_size
            self._map: mmap.mmap | None = None
            self._staging: torch.Tensor | None = None
        except BaseException:
            self._fh.close()
            raise

    def _read_exact(self, offset: int, n: int, into: memoryview | None = None) -> bytes:
        """n bytes at offset (into ``into`` when given); short reads are retried."""
        buf = into if into is not None else memoryview(bytearray(n))
        done = 0
        self._fh.seek(offset)
        while done < n:
            got = self._fh.readinto(buf[done:n])
            if not got:
                raise CheckpointError(f"{self.path}: unexpected end of file at byte {offset + done} "
                                      "(truncated while being read?)")
            done += got
        return bytes(buf) if into is None else b""

    # ---- introspection -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # ---- reading -------------------------------------------------------------------------
    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            # ACCESS_COPY (a private map) is writable, which torch.frombuffer wants, and never
            # writes back to the file.
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def load(self, key: str, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
        """A fresh tensor (owning its memory) for ``key``, cast to ``dtype`` (floating tensors
        only) and moved to ``device``."""
        info = self.tensors[key]
        target_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        target_device = torch.device(device) if device is not None else torch.device("cpu")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=target_dtype, device=target_device)
        if self.io == "mmap":
            return self._load_mapped(key, info, target_dtype, target_device)
        if target_device.type == "cpu" and target_dtype == info.dtype:
            out = torch.empty(info.shape, dtype=info.dtype)
            self._read_exact(info.start, info.nbytes, _bytes_view(out))
            return out
        staging = self._staging_buffer(info.nbytes)
        self._read_exact(info.start, info.nbytes, _bytes_view(staging))
        view = staging.view(info.dtype).reshape(info.shape)
        return view.to(device=target_device, dtype=target_dtype, copy=True)

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        # One buffer for the whole file, sized for the largest tensor that needs staging, so
        # casts / device copies never allocate a second copy of more than one tensor.
        if self._staging is None or self._staging.numel() < nbytes:
            largest = max(t.nbytes for t in self.tensors.values())
            self._staging = torch.empty(max(nbytes, largest), dtype=torch.uint8)
        return self._staging[:nbytes]

    def _load_mapped(self, key: str, info: TensorInfo, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        mm = self._mapping()
        try:
            view = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
            view = view.view(info.dtype).reshape(info.shape)
            out = view.to(device=device, dtype=dtype, copy=True)
            del view
        except OSError as exc:
            raise CheckpointError(f"{self.path}: reading tensor {key!r} failed: {exc}") from None
        self._release_pages(info.start, info.end)
        return out

    def _release_pages(self, start: int, end: int) -> None:
        # Drop the pages we just copied from, so resident memory stays ~1x the weights. The
        # map is private and never written, so this only forgets pages (they stay in the page
        # cache and a later access, e.g. of a neighbouring tensor, reads them back).
        if not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = start // _PAGE * _PAGE
        last = min(-(-end // _PAGE) * _PAGE, self._file_size)
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._staging = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the GC will unmap it later
                pass
            self._map = None
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor infos and ``__metadata__`` of a file, without reading any tensor data."""
    with SafetensorsFile(path) as f:
        return dict(f.tensors), dict(f.metadata)
