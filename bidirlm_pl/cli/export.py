"""``bidirlm export``: a Lightning checkpoint of any stage -> an HF folder (plus the stage's extra files).

    bidirlm export --ckpt runs/contrastive/checkpoints/last.ckpt --output models/encoder [--overwrite]

``--ckpt`` may also be a sharded checkpoint folder (FSDP2 with ``save_distributed_checkpoint: true``):
its shards are consolidated in this one process (no process group needed), so the export equals
the one an unsharded run writes. The checkpoint is read with ``torch.load(weights_only=True)``
(no arbitrary unpickling); the stage
is rebuilt from its saved hyperparameters (its base model folder or asset must still exist), the
trained weights are loaded strictly, and the folder is written atomically (temporary sibling, rename).
A contrastive checkpoint yields a folder that ``SentenceTransformer(dir)`` and ``AutoModel`` load.
"""

from __future__ import annotations

import argparse

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import push_folder, split_hub_id
from bidirlm_pl.stages.checkpoint import export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="Lightning checkpoint (.ckpt file, or sharded checkpoint folder) written by `bidirlm fit`")
    parser.add_argument("--output", required=True, help="target folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="also upload the folder to this hub repo (created when missing; token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")


def main(args: argparse.Namespace) -> int:

    if args.push_to_hub is not None and (split_hub_id(args.push_to_hub) is None or "@" in args.push_to_hub):
        raise BidirLMError(f"--push-to-hub '{args.push_to_hub}' is not a hub repo id; expected 'org/name'")
    folder = export_checkpoint(args.ckpt, args.output, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {folder}")
    if args.push_to_hub is not None:
        print(f"pushed {folder} -> {push_folder(folder, args.push_to_hub, private=args.private)}")
    return 0
