"""Cut an exported pipeline's CLIP text encoders (in place) to the ShapeWorld words.

The training scripts export cut vocabularies already (:func:`trainkit.cut_clip_vocab`); this
rewrites a folder exported before they did. Each ``text_encoder*`` folder that holds a CLIP text
model gets the token-embedding rows of :data:`diffaccel.shapeworld.WORDS` and the matching
tokenizer; on ShapeWorld prompts the pipeline's images do not change by a bit, and the check
below says so before anything is written.

    python train/cut_text_vocab.py assets/models/micro-sd
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit
from diffaccel.shapeworld import WORDS, eval_prompts


def cut_folder(folder: pathlib.Path) -> None:
    """Cut every CLIP ``text_encoder*`` of the pipeline folder ``folder``; raises if an encoder's
    outputs on ShapeWorld prompts would change."""
    from transformers import AutoModel, CLIPTokenizer

    prompts = [p for kind in ("single", "relation", "count") for p in eval_prompts(kind, 32)]
    for encoder_dir in sorted(folder.glob("text_encoder*")):
        tokenizer_dir = folder / encoder_dir.name.replace("text_encoder", "tokenizer")
        encoder = AutoModel.from_pretrained(str(encoder_dir))
        if encoder.config.model_type != "clip_text_model":
            continue
        old_tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        with torch.no_grad():
            ids = old_tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids
            before = encoder(ids)[0]
            tokenizer = trainkit.cut_clip_vocab(encoder, WORDS, old_tokenizer.model_max_length)
            after = encoder(tokenizer(prompts, padding="max_length", return_tensors="pt").input_ids)[0]
        if not torch.equal(before, after):
            raise RuntimeError(f"{encoder_dir}: the cut vocabulary changes the encoder's outputs")
        dtype = next(encoder.parameters()).dtype
        encoder.to(torch.float16).save_pretrained(str(encoder_dir), safe_serialization=True)
        encoder.config.dtype = dtype  # loads as it did (trainkit.export_pipeline_fp16)
        encoder.config.to_json_file(str(encoder_dir / "config.json"))
        tokenizer.save_pretrained(str(tokenizer_dir))
        print(f"{encoder_dir}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=pathlib.Path)
    cut_folder(parser.parse_args().folder)
