"""Hard-negative mining, the resumable part: embeddings written to disk shard by shard, reused on a rerun.

A cache folder holds ``manifest.json`` (the key: model files, encoder settings, prompts, sources, shard size)
and one ``NAME-00000.safetensors`` per shard (the float32 embeddings, with a digest of the shard's texts in
its metadata), plus ``NAME-00000.texts.jsonl`` where the texts are needed again (corpus shards: the chosen
negatives are looked up there, so a corpus larger than memory never has to be held). Every file is written
to a temporary name and renamed when complete, so a killed run leaves whole shards only; a rerun with the
same key reuses every shard whose texts are unchanged and embeds the rest. A different key (another model,
prompt, source or shard size) deletes the old shards first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from bidirlm_pl.core.checkpoint_io import atomic_write_bytes
from bidirlm_pl.core.errors import BidirLMError

MANIFEST = "manifest.json"
VERSION = 1
# a shard file, or a temporary one a killed write left (atomic_write_bytes: .NAME.tmp-PID)
SHARD_FILE = re.compile(r"^\.?[\w.-]+-\d{5,}(\.safetensors|\.texts\.jsonl)(\.tmp-\d+)?$")


def texts_digest(texts: list[str]) -> str:
    """A digest of a list of texts (length-prefixed, so no separator can collide)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def model_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of a model folder's files: a changed checkpoint changes the key."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


class ShardCache:
    """Embedding shards of one mining run (``key_fields`` say which), in ``folder``.

    >>> cache = ShardCache(Path("runs/.mined.mine-cache"), {"model": "tiny-qwen3"})  # doctest: +SKIP
    >>> cache.embeddings("corpus", 0, ["a text"], embed, keep_texts=True).shape  # doctest: +SKIP
    torch.Size([1, 64])
    """

    def __init__(self, folder: str | Path, key_fields: dict):
        self.folder = Path(folder)
        fields = {"version": VERSION, **key_fields}
        self.key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.reused: Counter[str] = Counter()
        self.embedded: Counter[str] = Counter()
        self.stale = False
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text()).get("key")
            except (OSError, ValueError):
                old = None
            self.stale = old != self.key
            if self.stale:
                self._remove_files()
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise BidirLMError(f"cache folder '{self.folder}' holds files but no {MANIFEST}: not a mining cache; "
                               "pass another --cache-dir")
        if not manifest.is_file():
            text = json.dumps({"key": self.key, "fields": fields}, indent=2, sort_keys=True, default=str)
            atomic_write_bytes(manifest, (text + "\n").encode())

    def _remove_files(self) -> None:
        """This cache's own files (shards, their texts, the manifest), never anything else in the folder."""
        for path in self.folder.iterdir():
            if path.is_file() and (path.name == MANIFEST or SHARD_FILE.match(path.name)):
                path.unlink()

    def path(self, name: str, index: int, suffix: str = ".safetensors") -> Path:
        return self.folder / f"{name}-{index:05d}{suffix}"

    def _load(self, path: Path, digest: str) -> torch.Tensor | None:
        """A shard's embeddings when it exists, reads back and holds exactly these texts; else None."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("digest") != digest:
                    return None
                return handle.get_tensor("embeddings")
        except (OSError, ValueError, RuntimeError, SafetensorError):  # damaged outside this tool: embed it again
            return None

    def embeddings(self, name: str, index: int, texts: list[str], embed: Callable[[list[str]], torch.Tensor],
                   *, keep_texts: bool = False) -> torch.Tensor:
        """Shard ``index`` of ``name``: reused from disk when complete for these texts, else embedded and saved."""
        digest = texts_digest(texts)
        path = self.path(name, index)
        texts_path = self.path(name, index, ".texts.jsonl")
        found = self._load(path, digest)
        if keep_texts and (found is None or not texts_path.is_file()):
            lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
            atomic_write_bytes(texts_path, lines.encode("utf-8"))
        if found is not None:
            self.reused[name] += 1
            return found
        embedded = embed(texts).float().cpu().contiguous()
        assert embedded.shape[0] == len(texts), (embedded.shape, len(texts))
        atomic_write_bytes(path, save({"embeddings": embedded}, metadata={"digest": digest, "rows": str(len(texts))}))
        self.embedded[name] += 1
        return embedded

    def texts(self, name: str, index: int) -> list[str]:
        """The texts of a shard saved with ``keep_texts``."""
        with open(self.path(name, index, ".texts.jsonl"), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    def counts(self) -> dict:
        names = sorted(set(self.reused) | set(self.embedded))
        return {n: {"reused": self.reused[n], "embedded": self.embedded[n],
                    "total": self.reused[n] + self.embedded[n]} for n in names}

    def remove(self) -> None:
        """Delete the cache (its own files; the folder too when nothing else is left in it)."""
        self._remove_files()
        if not any(self.folder.iterdir()):
            self.folder.rmdir()
