"""Stream tensors in and out of (sharded) safetensors checkpoints without holding a model in memory.

``Checkpoint`` reads one tensor (or a block of its rows) at a time with ``safetensors.safe_open``;
``StreamingWriter`` writes sharded safetensors whose headers are planned up front from the tensor
shapes, so tensor bytes go to disk as soon as they are computed and no shard is ever assembled in
memory. Together they keep a merge's peak memory at a few row blocks, whatever the model size.

>>> ckpt = Checkpoint("gemma3-270m")  # doctest: +SKIP
>>> ckpt.read("model.norm.weight").shape  # doctest: +SKIP
torch.Size([640])
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import resolve_model_folder

if sys.byteorder != "little":
    raise BidirLMError("this host is big-endian; the streaming safetensors writer needs a little-endian host")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")

# safetensors dtype codes <-> torch dtypes
DTYPE_CODES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def parse_size(size: int | str) -> int:
    """Bytes from ``2GB``, ``500MB``, ``64KB`` or an integer."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(size).upper())
    if not match:
        raise BidirLMError(f"size '{size}' is not a byte count such as 2GB, 500MB or 1048576")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
    return int(float(match.group(1)) * scale[match.group(2)])


def resolve_folder(name_or_path: str | Path) -> Path:
    """A local model folder for an asset name, a local folder or a hub id (as ``backbone.resolve_model_path``,
    without importing transformers, which would cost seconds and hundreds of MB in a merge process)."""

    return resolve_model_folder(name_or_path, what="model folder")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from the shard headers only."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A Hugging Face folder's safetensors weights, opened lazily.

    Args:
        folder: a model folder (single ``model.safetensors`` or an index with shards) or an offline asset.
        reopen_bytes: close and reopen a shard after reading this many bytes from it, so that the
            memory-mapped pages already read are released instead of accumulating in the resident set.
    """

    def __init__(self, folder: str | Path, *, reopen_bytes: int = 16 * 2**20, expert: int | None = None):
        self.name = str(folder)
        self.folder = resolve_folder(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.reopen_bytes = reopen_bytes
        self.expert = expert if self.is_ubmoe else None
        files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    code = view.get_dtype()
                    if code not in DTYPE_CODES:
                        raise BidirLMError(f"tensor '{key}' in '{file}' has dtype {code}, which merging does not support")
                    self.tensors[key] = TensorInfo(file, DTYPE_CODES[code], tuple(view.get_shape()))
        self.stored_key: dict[str, str] = {}  # a view's key -> the key stored in the files
        if self.expert is not None:
            self._plain_view(self.expert)
        self._handles: dict[Path, list] = {}  # file -> [safe_open handle, bytes read since opening]

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise BidirLMError(f"index '{index}' has no weight_map; expected a safetensors shard index")
            files = sorted({self.folder / name for name in weight_map.values()})
            missing = [str(f.name) for f in files if not f.exists()]
            if missing:
                raise BidirLMError(f"model folder '{self.folder}' lacks shard '{missing[0]}' named in {INDEX_FILE}")
            return files
        if (self.folder / SINGLE_FILE).exists():
            return [self.folder / SINGLE_FILE]
        raise BidirLMError(
            f"model folder '{self.folder}' has no {SINGLE_FILE} or {INDEX_FILE}; merging reads safetensors only"
        )

    @property
    def is_ubmoe(self) -> bool:
        """A UBMoE folder (``config.json`` has a ``ubmoe`` entry; FFN experts under ``mlp.experts.{0,1}``)."""
        return "ubmoe" in self.config

    def _plain_view(self, expert: int) -> None:
        """Show a UBMoE folder as the plain model with expert ``expert``'s FFNs (routers and the other expert hidden)."""
        pattern = re.compile(r"\.mlp\.(experts\.(\d+)|router)\.")
        view: dict[str, TensorInfo] = {}
        for key, info in self.tensors.items():
            match = pattern.search(key)
            if match is None:
                view[key] = info
            elif match.group(2) is not None and int(match.group(2)) == expert:
                plain = key[:match.start()] + ".mlp." + key[match.end():]
                view[plain] = info
                self.stored_key[plain] = key
        if not self.stored_key:
            raise BidirLMError(f"UBMoE folder '{self.folder}' has no tensors of expert {expert}")
        self.tensors = view

    # ------------------------------------------------------------------ metadata
    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def ties_embeddings(self) -> bool:
        """Whether the config ties the output layer to the input embedding (transformers' default: yes)."""
        text_config = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", True)))

    def embedding_key(self) -> str | None:
        """The key of the (language model's) input embedding matrix."""
        for key in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"):
            if key in self.tensors:
                return key
        candidates = [k for k in self.tensors if k.endswith("embed_tokens.weight")]
        return candidates[0] if len(candidates) == 1 else None

    # ------------------------------------------------------------------ reading
    def _handle(self, file: Path, nbytes: int):
        entry = self._handles.get(file)
        if entry is None or entry[1] + nbytes > self.reopen_bytes:
            self._handles.pop(file, None)  # drop the old mapping first
            entry = self._handles[file] = [safe_open(str(file), framework="pt"), 0]
        entry[1] += nbytes
        return entry[0]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``key`` (or its rows ``[start, stop)`` along dim 0), in its stored dtype."""
        info = self.tensors[key]
        key = self.stored_key.get(key, key)
        if rows is None or not info.shape:
            return self._handle(info.file, info.nbytes).get_tensor(key)
        start, stop = rows
        row_bytes = info.nbytes // max(1, info.shape[0])
        return self._handle(info.file, row_bytes * (stop - start)).get_slice(key)[start:stop]

    def close(self) -> None:
        self._handles.clear()


def row_blocks(shape: tuple[int, ...], max_elements: int, splits: tuple[int, ...] = ()) -> list[tuple[int, int] | None]:
    """Row ranges along dim 0 holding at most ``max_elements`` each (``[None]`` for scalars).

    ``splits`` are extra row boundaries that no block may straddle (e.g. the end of a shared vocabulary).
    """
    if not shape:
        return [None]
    rows = shape[0]
    if rows == 0:
        return [(0, 0)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // per_row)
    bounds = sorted({0, rows, *range(step, rows, step), *[s for s in splits if 0 < s < rows]})
    return list(itertools.pairwise(bounds))


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingWriter:
    """Write planned tensors, in plan order and block by block, into sharded safetensors files.

    Headers are computed from the plan before any data exists, so each block is appended to its
    shard as it arrives. ``close()`` checks every tensor was written completely and writes the index.

    >>> plan = [PlannedTensor("w", torch.float32, (2, 3))]  # doctest: +SKIP
    >>> with StreamingWriter(folder, plan) as writer:  # doctest: +SKIP
    ...     writer.write("w", torch.zeros(2, 3))
    """

    def __init__(self, folder: str | Path, plan: list[PlannedTensor], *, max_shard_bytes: int | str = "2GB",
                 metadata: dict[str, str] | None = None, max_pending: int = 1):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        limit = parse_size(max_shard_bytes)
        names = [t.name for t in plan]
        assert len(set(names)) == len(names), "duplicate tensor names in the write plan"
        self.shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for tensor in plan:
            if self.shards[-1] and size + tensor.nbytes > limit:
                self.shards.append([])
                size = 0
            self.shards[-1].append(tensor)
            size += tensor.nbytes
        count = len(self.shards)
        self.files = [SINGLE_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self.total_size = sum(t.nbytes for t in plan)
        self._queue = [(shard, tensor) for shard, tensors in enumerate(self.shards) for tensor in tensors]
        self._position = 0      # index into _queue of the tensor being written
        self._written = 0       # bytes of that tensor written so far
        self._shard = -1
        self._handle = None
        # file writes run on one background thread (in order) while the caller computes the next block
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._pending: deque = deque()
        self.max_pending = max_pending

    def _open_shard(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for tensor in self.shards[shard]:
            header[tensor.name] = {"dtype": CODE_OF_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8-byte alignment
        self._handle = open(self.folder / self.files[shard], "wb")  # noqa: SIM115 (closed by the next shard or close())
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)

    def _write_bytes(self, data) -> None:
        self._handle.write(data)

    def _submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.max_pending:
            self._pending.popleft().result()  # bounded memory; re-raises a failed write

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append the next rows of tensor ``name`` (must be the tensor the plan expects next)."""
        assert self._position < len(self._queue), f"tensor '{name}' is not in the write plan"
        shard, tensor = self._queue[self._position]
        assert name == tensor.name, f"expected tensor '{tensor.name}' next, got '{name}'"
        assert block.dtype == tensor.dtype, f"tensor '{name}': block dtype {block.dtype} != planned {tensor.dtype}"
        data = block.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._written += data.nbytes
        assert self._written <= tensor.nbytes, f"tensor '{name}' received more bytes than its planned shape"
        if shard != self._shard:
            self._shard = shard
            self._submit(self._open_shard, shard)
        self._submit(self._write_bytes, data)
        if self._written == tensor.nbytes:
            self._position += 1
            self._written = 0

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self._pool.shutdown()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._position != len(self._queue):
            raise AssertionError(f"tensor '{self._queue[self._position][1].name}' was not fully written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {t.name: self.files[s] for s, ts in enumerate(self.shards) for t in ts}}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._handle is not None:
            self._handle.close()


def is_weight_file(path: Path) -> bool:
    return path.name == INDEX_FILE or path.suffix in WEIGHT_SUFFIXES
