"""Model references: offline assets, local folders and Hugging Face Hub ids (``org/name`` or ``org/name@rev``).

A hub id resolves through ``huggingface_hub.snapshot_download`` into the standard cache
(``HF_HOME`` / ``HF_HUB_CACHE``), fetching only configs, tokenizers and safetensors weights
(never pickled weights). With ``HF_HUB_OFFLINE=1`` the cache alone answers. Every failure
is one line naming the id: not cached while offline, gated, private or missing, bad revision.

A hub id resolves once per process: the stage's config check, the data module's tokenizer,
``load_backbone`` and the export's model card all get the snapshot of the first resolution, so a run
asks the hub once and cannot mix two commits of a branch that moves meanwhile. Asset names and local
folders are checked on every call (a file test, and their answer follows the working directory and
``BIDIRLM_CACHE``).

>>> resolve_model_folder("tiny-qwen3")            # doctest: +SKIP  (offline asset)
>>> resolve_model_folder("Qwen/Qwen3-0.6B")       # doctest: +SKIP  (hub id, cached after the first call)
>>> resolve_model_folder("Qwen/Qwen3-0.6B@main")  # doctest: +SKIP  (a branch, tag or commit)
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError, first_line
from bidirlm_pl.core.published import native_folder

# What a model folder needs; pickled weights (*.bin, *.pt, *.pth, *.ckpt) never match.
MODEL_FILE_PATTERNS = [
    "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", "README.md",
]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
LOGIN_HINT = "pass a token with HF_TOKEN or `hf auth login`"


def split_hub_id(reference: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``reference`` is shaped like a hub id, else None.

    >>> split_hub_id("Qwen/Qwen3-0.6B@v1")
    ('Qwen/Qwen3-0.6B', 'v1')
    >>> split_hub_id("runs/quickstart/hf") is None
    True
    """
    match = _HUB_ID.match(str(reference))
    return (match["repo"], match["revision"]) if match else None


def is_hub_id(reference: str | Path) -> bool:
    """A reference that names a hub repo: shaped ``org/name[@rev]`` and not an existing local path."""
    return split_hub_id(str(reference)) is not None and not Path(str(reference)).expanduser().exists()


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_folder(reference: str | Path, *, what: str = "model path") -> Path:
    """The local folder of an offline asset name, a local folder, or a hub id (downloaded into the cache).

    A published BidirLM checkpoint (``model_type: bidirlm``, custom code) resolves to its native transformers
    folder, converted once (``bidirlm_pl.core.published``). Raises a one-line :class:`BidirLMError` for a
    reference that is none of them.
    """

    name = str(reference)
    if name in assets.ASSETS:
        return assets.ASSETS[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BidirLMError(f"model folder '{path}' has no config.json; expected a Hugging Face model folder")
        return native_folder(path)
    if split_hub_id(name) is None:
        raise BidirLMError(f"{what} '{name}' does not exist; expected a local folder with config.json, an offline "
                           "asset (`bidirlm assets list`) or a hub id 'org/name[@revision]'")
    return native_folder(hub_model_folder(name))


@functools.cache
def hub_model_folder(hub_id: str) -> Path:
    """The checked snapshot folder of a model hub id, downloaded on the first call of a process and remembered
    (failures are not: a later call tries again). ``hub_model_folder.cache_clear()`` forgets them."""
    folder = download_model(hub_id)
    if not (folder / "config.json").exists():
        raise BidirLMError(f"hub repo '{hub_id}' has no config.json; expected a transformers model repo")
    if not any(folder.glob("*.safetensors")):
        raise BidirLMError(f"hub repo '{hub_id}' has no safetensors weights; this tool loads safetensors only "
                           "(pickled weights are never fetched)")
    return folder


def download_model(hub_id: str) -> Path:
    """``snapshot_download`` of a model's config, tokenizer and safetensors files; errors are one line."""
    repo_id, revision = split_hub_id(hub_id)
    return Path(_snapshot(repo_id, revision, "model", MODEL_FILE_PATTERNS, what=f"model '{hub_id}'"))


def _snapshot(repo_id: str, revision: str | None, repo_type: str, patterns: list[str] | None, *, what: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns)
    except Exception as err:
        raise hub_error(err, repo_id, repo_type, what=what) from err


def hub_error(err: Exception, repo_id: str, repo_type: str = "model", *, what: str | None = None) -> BidirLMError:
    """A one-line :class:`BidirLMError` for a huggingface_hub failure (others keep their first line)."""
    from huggingface_hub import errors

    what = what or f"{repo_type} '{repo_id}'"
    if isinstance(err, errors.GatedRepoError):
        return _gated(what, repo_id, repo_type)
    if isinstance(err, errors.RepositoryNotFoundError):
        return _not_found(what)
    if isinstance(err, errors.RevisionNotFoundError):
        return BidirLMError(f"{what}: the revision does not exist on the Hugging Face Hub; expected a branch, "
                            "tag or commit of the repo")
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return _not_cached(what, repo_id, repo_type)
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "?")
        return BidirLMError(f"{what}: the Hugging Face Hub answered HTTP {status}; {LOGIN_HINT} if it is private")
    return BidirLMError(f"{what}: {first_line(err)}")


def _gated(what: str, repo_id: str, repo_type: str) -> BidirLMError:
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    return BidirLMError(f"{what} is gated on the Hugging Face Hub: accept its terms at {page}, then {LOGIN_HINT}")


def _not_found(what: str) -> BidirLMError:
    return BidirLMError(f"{what} is not on the Hugging Face Hub, or is private: check the id, or {LOGIN_HINT}")


def _not_cached(what: str, repo_id: str, repo_type: str) -> BidirLMError:
    download = f"hf download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id}"
    if offline():
        return BidirLMError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE=1; fetch it where there "
                            f"is network: {download}")
    return BidirLMError(f"{what} is not in the Hugging Face cache and the hub cannot be reached; fetch it where "
                        f"there is network ({download}), then set HF_HUB_OFFLINE=1")


def cached_snapshot(repo_id: str, revision: str | None, repo_type: str) -> Path | None:
    """The cached snapshot folder of a repo at a branch, tag or commit (what `hf download` fills), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    revision = revision or "main"
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def load_dataset(dataset: str, *, name: str | None = None, split: str | None = None,
                 data_files=None, streaming: bool = False, what: str | None = None):
    """``datasets.load_dataset`` for a builder, a local folder or a hub id (``org/name[@rev]``).

    Online, ``datasets`` downloads (or streams) as usual. Offline (``HF_HUB_OFFLINE=1``) it reads
    its own prepared cache, and when a hub id has only been fetched with `hf download --repo-type
    dataset` (a snapshot in the hub cache), that snapshot is loaded as a local folder. Failures are
    one line naming the dataset.
    """
    import datasets

    what = what or f"dataset '{dataset}'"
    hub = split_hub_id(dataset) if is_hub_id(dataset) else None
    path, revision = hub if hub else (dataset, None)
    kwargs = {"name": name, "split": split, "data_files": data_files, "streaming": streaming}
    try:
        return datasets.load_dataset(path, revision=revision, **kwargs)
    except Exception as err:
        if hub is None:
            raise BidirLMError(f"{what}: {first_line(err)}") from err
        snapshot = cached_snapshot(path, revision, "dataset") if offline() else None
        if snapshot is not None:
            try:
                return datasets.load_dataset(str(snapshot), **kwargs)
            except Exception as local_err:
                raise BidirLMError(f"{what}: cached snapshot {snapshot}: {first_line(local_err)}") from local_err
        raise _dataset_error(err, path, what) from err


def _dataset_error(err: Exception, repo_id: str, what: str) -> BidirLMError:
    from huggingface_hub import errors

    chain, cause = [], err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return hub_error(cause, repo_id, "dataset", what=what)
    text = " ".join(first_line(c) for c in chain).lower()
    if "gated" in text:
        return _gated(what, repo_id, "dataset")
    if offline() and ("offline" in text or "couldn't reach" in text):
        return _not_cached(what, repo_id, "dataset")
    if "doesn't exist on the hub" in text or "cannot be accessed" in text:
        return _not_found(what)
    return BidirLMError(f"{what}: {first_line(err)}")



def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, message: str | None = None) -> str:
    """Upload a finished model folder to the hub repo ``repo_id`` (created when missing); return its URL.

    The token comes from ``HF_TOKEN`` or ``hf auth login``, as for every Hugging Face tool.
    """
    from huggingface_hub import HfApi

    if split_hub_id(repo_id) is None or "@" in repo_id:
        raise BidirLMError(f"push target '{repo_id}' is not a hub repo id; expected 'org/name'")
    if offline():
        raise BidirLMError(f"cannot push to '{repo_id}' with HF_HUB_OFFLINE=1; push from a machine with network: "
                           f"hf upload {repo_id} {folder}")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                          commit_message=message or f"bidirlm-pl export of {Path(folder).name}")
    except Exception as err:
        raise hub_error(err, repo_id, what=f"push to '{repo_id}'") from err
    return f"{api.endpoint}/{repo_id}"
