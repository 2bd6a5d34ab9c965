"""``bidirlm omni-encode``: embed sentences, images and audio clips with an omni folder; print their cosines.

    bidirlm omni-encode --model runs/omni-tiny/contrastive/hf --text "a red circle" --image cat.png \\
        --audio clip.wav --output runs/omni-tiny/encoded
    bidirlm omni-encode --model ... --demo --output ...   # a generated red circle, a high tone, two sentences

Writes ``embeddings.safetensors`` (one (N, D) matrix per modality, L2-normalised) and
``similarity.json`` (labels and the cosine matrix), staged and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.data.omni import _read_wav, shape_image, tone
from bidirlm_pl.models.omni.model import OmniEncoder


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="omni folder (bidirlm compose, or a trained omni export)")
    parser.add_argument("--text", action="append", default=[], help="a sentence to embed (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--audio", action="append", default=[], help="a 16 kHz WAV file (repeatable)")
    parser.add_argument("--demo", action="store_true", help="add a generated red circle, a high tone and captions")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def main(args) -> int:
    import numpy as np
    import torch
    from safetensors.torch import save_file


    output = Path(args.output)
    if output.exists() and not args.overwrite:  # before any model loads
        raise BidirLMError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    texts, labels = list(args.text), {"text": list(args.text), "image": [], "audio": []}
    images, clips = [], []
    for path in args.image:
        from PIL import Image, UnidentifiedImageError

        try:
            images.append(np.asarray(Image.open(path).convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError) as err:
            raise BidirLMError(f"image '{path}' cannot be read: {err}") from err
        labels["image"].append(path)
    for path in args.audio:
        if not Path(path).is_file():
            raise BidirLMError(f"audio file '{path}' does not exist")
        clips.append(_read_wav(Path(path)))
        labels["audio"].append(path)
    if args.demo:
        images.append(shape_image("red", "circle"))
        labels["image"].append("generated: a red circle")
        clips.append(tone("high", "short"))
        labels["audio"].append("generated: a high short tone")
        texts += ["a red circle", "a high short tone"]
        labels["text"] += ["a red circle", "a high short tone"]
    if not (texts or images or clips):
        raise BidirLMError("nothing to embed: give --text, --image, --audio or --demo")
    encoder = OmniEncoder.from_folder(args.model)
    embeddings = {}
    if texts:
        embeddings["text"] = encoder.encode(texts)
    if images:
        embeddings["image"] = encoder.encode_images(images)
    if clips:
        embeddings["audio"] = encoder.encode_audio(clips)
    names = [f"{m}: {label}" for m in ("text", "image", "audio") if m in embeddings for label in labels[m]]
    matrix = torch.cat([embeddings[m] for m in ("text", "image", "audio") if m in embeddings])
    cosine = (matrix @ matrix.T).tolist()
    with atomic_folder(output, overwrite=args.overwrite) as staging:
        save_file({k: v.contiguous() for k, v in embeddings.items()}, staging / "embeddings.safetensors")
        (staging / "similarity.json").write_text(json.dumps({"labels": names, "cosine": cosine}, indent=2))
    width = max(len(n) for n in names)
    for name, row in zip(names, cosine):
        print(f"{name:<{width}}  " + " ".join(f"{c:6.3f}" for c in row))
    print(f"embeddings ({matrix.shape[1]} dims) -> {output}")
    return 0
