"""Train micro-CLIP: a tiny ``transformers.CLIPModel`` learned contrastively on ShapeWorld.

Each batch holds ShapeWorld images, their captions, and one *hard negative* caption per image (the
same scene with a changed color, shape, count or the opposite relation), so the towers must bind
colors to shapes and read relations instead of matching bags of words. The text tower (hidden 64,
CLIP's real 49408-token vocabulary and tokenizer, 77 positions) is micro-SD's text encoder.

Contrastive training alone teaches the text tower to all but erase the relation word (see
:func:`relation_token_change`), so micro-SD's UNet, which reads the tower's token states, cannot
tell "left of" from "right of". ``--relation-weight`` adds an auxiliary loss
(:func:`relation_loss`): a linear probe (trained along, not exported) must read the relation from
every token state from the relation word to the end of the 77-token sequence the UNet reads.

    python train/micro_clip.py --steps 3000 --resume --export assets/models/micro-clip
    python train/micro_clip.py --init assets/models/micro-clip --steps 800 --lr 2e-4 --run-dir runs/micro-clip-ft
    python train/micro_clip.py --init assets/models/micro-clip --relation-weight 1 --steps 800 --lr 3e-4 \
        --run-dir runs/micro-clip-rel

The exported folder loads offline with ``CLIPModel.from_pretrained`` (``CLIPImageProcessor`` too:
64x64 RGB, normalized to [-1, 1]); the tokenizer is ``diffaccel.tokenizers.clip_tokenizer()``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import trainkit
from diffaccel.shapeworld import COLORS, RELATIONS, SHAPES, Scene, ShapeWorldImages
from diffaccel.shapeworld.scenes import NUMBERS
from diffaccel.tokenizers import clip_tokenizer

IMAGE_SIZE = 64
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
assert set(_OPPOSITE) == set(RELATIONS)


def clip_config(size: str = "micro"):
    """The micro (bundled) or tiny (tests) ``CLIPConfig``."""
    from transformers import CLIPConfig

    width = {"micro": (64, 128, 4), "tiny": (16, 16, 1)}[size]
    text = {"vocab_size": 49408, "hidden_size": width[0], "intermediate_size": 4 * width[0],
            "num_hidden_layers": width[2], "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    vision = {"image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3, "hidden_size": width[1],
              "intermediate_size": 4 * width[1], "num_hidden_layers": width[2],
              "num_attention_heads": 4, "hidden_act": "quick_gelu"}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width[0])


def perturb(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that ``scene``'s image does *not* show: changed color, shape, count or relation."""
    objects = list(scene.objects)
    if scene.relation is not None:
        a, b = objects
        if rng.random() < 0.5 or a.pair == b.pair:
            return dataclasses.replace(scene, relation=_OPPOSITE[scene.relation])
        if a.color != b.color and rng.random() < 0.5:  # swap the colors: binding
            objects = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
            return dataclasses.replace(scene, objects=tuple(objects))
        return dataclasses.replace(scene, objects=(b, a))  # "A left of B" -> "B left of A"
    choice = rng.integers(3 if len(objects) > 1 else 2)
    if choice == 2:  # another count of the same object
        n = int(rng.choice([k for k in NUMBERS if k != len(objects) and k > 1] or [2]))
        objects = [objects[0]] * n
        return dataclasses.replace(scene, objects=tuple(objects))
    field, pool = ("color", list(COLORS)) if choice == 0 else ("shape", list(SHAPES))
    new = str(rng.choice([v for v in pool if v != getattr(objects[0], field)]))
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, **{field: new}) for o in objects))


def contrastive_loss(model, pixels: torch.Tensor, captions: list[str], negatives: list[str],
                     tokenizer) -> torch.Tensor:
    """Symmetric InfoNCE; each image also competes against every hard-negative caption."""
    tokens = tokenizer(captions + negatives, padding=True, return_tensors="pt").to(pixels.device)
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    n = len(captions)
    target = torch.arange(n, device=pixels.device)
    image_to_text = F.cross_entropy(out.logits_per_image, target)
    text_to_image = F.cross_entropy(out.logits_per_text[:n], target)
    return (image_to_text + text_to_image) / 2


def relation_loss(text_model, probe: torch.nn.Linear, scenes: list[Scene], tokenizer) -> torch.Tensor:
    """Cross-entropy of ``probe`` reading the relation from each token state of the text tower, from
    the relation word to the last of the ``model_max_length`` positions (padding included, no
    attention mask: what a Stable Diffusion pipeline feeds its UNet). Every relation caption is
    paired with its flipped twin, so the two differ only in the relation word. Scenes without a
    relation are skipped; none at all gives a zero loss."""
    scenes = [s for s in scenes if s.relation is not None]
    device = next(text_model.parameters()).device
    if not scenes:
        return torch.zeros((), device=device)
    scenes = scenes + [dataclasses.replace(s, relation=_OPPOSITE[s.relation]) for s in scenes]
    ids = tokenizer([s.caption for s in scenes], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    n = len(scenes) // 2
    differs = torch.cat([ids[:n] != ids[n:]] * 2)  # the relation word's position (same in both twins)
    after = differs.int().cumsum(1) > 0
    states = text_model(input_ids=ids.to(device))[0]
    labels = torch.tensor([RELATIONS.index(s.relation) for s in scenes]).repeat_interleave(after.sum(1))
    return F.cross_entropy(probe(states[after.to(device)]), labels.to(device))


@torch.no_grad()
def evaluate(model, tokenizer, n: int = 256, batch: int = 64, seed: int = 1,
             split: str = "heldout") -> dict[str, float]:
    """Zero-shot scores on ``n`` images of ``split``.

    ``retrieval``: the caption picked among the ``batch`` captions of its batch is the image's
    own (by text). ``hard_<kind>``: the image scores its caption above the perturbed one.
    """
    data = ShapeWorldImages(split, IMAGE_SIZE, length=n, seed=seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    hits, hard = 0, {}
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        scenes = [data.scene(i) for i in idx]
        pixels = torch.stack([data[i][0] for i in idx]).to(device)
        captions = [s.caption for s in scenes]
        negatives = [perturb(s, rng).caption for s in scenes]
        tokens = tokenizer(captions + negatives, padding=True, return_tensors="pt").to(device)
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        logits = out.logits_per_image
        m = len(captions)
        picked = logits[:, :m].argmax(1).tolist()
        hits += sum(captions[p] == c for p, c in zip(picked, captions))
        wins = (logits[torch.arange(m), torch.arange(m)] > logits[torch.arange(m), m + torch.arange(m)])
        for s, w in zip(scenes, wins.tolist()):
            hard.setdefault(s.kind, []).append(w)
    scores = {"retrieval": hits / n, "batch": float(batch)}
    scores.update({f"hard_{k}": float(np.mean(v)) for k, v in sorted(hard.items())})
    relations = [data.scene(i) for i in range(n) if data.scene(i).kind == "relation"]
    scores["relation_token_change"] = relation_token_change(model.text_model, tokenizer, relations)
    return scores


def relation_token_change(text_model, tokenizer, scenes: list[Scene]) -> float:
    """How much the text tower's token states (what micro-SD's UNet cross-attends to) change when
    a caption's relation is flipped ("left of" <-> "right of", "above" <-> "below"): the mean of
    1 - cosine similarity over the tokens from the relation word to the end of the caption.
    Near 0 means the relation is all but erased before it reaches the UNet."""
    flipped = [dataclasses.replace(s, relation=_OPPOSITE[s.relation]) for s in scenes]
    device = next(text_model.parameters()).device
    changes = []
    for scene, other in zip(scenes, flipped):
        tokens = tokenizer([scene.caption, other.caption], padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            states = text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        ids, mask = tokens.input_ids, tokens.attention_mask.bool()
        if ids.shape[1] == 0 or not torch.equal(mask[0], mask[1]):
            continue  # the flipped caption tokenizes to another length: no token-by-token match
        first = int((ids[0] != ids[1]).nonzero()[0])
        cos = F.cosine_similarity(states[0], states[1], dim=-1)[first:][mask[0][first:]]
        changes.append(float((1 - cos).mean()))
    return float(np.mean(changes)) if changes else float("nan")


def export(model, path: pathlib.Path, scores: dict | None = None) -> None:
    """Write the fp16 ``CLIPModel`` folder and its image processor config. The tokenizer (3.5 MB)
    is left out to save space: it is CLIP's, built offline by ``clip_tokenizer()``."""
    from transformers import CLIPImageProcessor

    path.mkdir(parents=True, exist_ok=True)
    trainkit.export_fp16(model, path)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE,
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(path))
    if scores is not None:
        (path / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from transformers import CLIPModel

    args = trainkit.parse_args("micro-clip", argv, batch_size=128, steps=3000, lr=5e-4,
                               eval_images=256, init="", relation_weight=0.0)
    torch.manual_seed(args.seed)
    if args.init:  # fine-tune a trained CLIPModel folder (e.g. the bundled micro-CLIP) instead
        model = CLIPModel.from_pretrained(args.init, dtype=torch.float32).to(args.device).train()
    else:
        model = CLIPModel(clip_config(args.config)).to(args.device).train()
    probe = (torch.nn.Linear(model.config.text_config.hidden_size, len(RELATIONS)).to(args.device)
             if args.relation_weight else None)  # created only when used: runs without it draw no extra randomness
    trained = model if probe is None else torch.nn.ModuleDict({"model": model, "probe": probe})
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=0.05)
    ckpt = trainkit.Checkpoint(args.run_dir)
    start = ckpt.load(trained, optimizer) if args.resume else 0
    tokenizer = clip_tokenizer()
    data = ShapeWorldImages("train", IMAGE_SIZE, length=trainkit.DATA_LENGTH, seed=args.seed)
    timer, loss = trainkit.Timer(args.save_every), None
    warmup = max(1, min(200, args.steps // 10))
    for step in (bar := trainkit.train_loop(args, start, "micro-clip")):
        for group in optimizer.param_groups:  # linear warmup, then cosine decay to 10%
            progress = min(1.0, max(0.0, (step - warmup) / max(1, args.steps - warmup)))
            scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * progress))
            group["lr"] = args.lr * scale
        rng = np.random.default_rng([args.seed, step])
        idx = [i % len(data) for i in trainkit.batch_indices(step, args.batch_size)]
        scenes = [data.scene(i) for i in idx]
        pixels = torch.stack([data[i][0] for i in idx]).to(args.device)
        negatives = [perturb(s, rng).caption for s in scenes]
        loss = contrastive_loss(model, pixels, [s.caption for s in scenes], negatives, tokenizer)
        if args.relation_weight:
            loss = loss + args.relation_weight * relation_loss(model.text_model, probe, scenes, tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if timer.due():
            ckpt.save(step + 1, trained, optimizer)
            if timer.stop:
                break
    if timer.stop:
        print(f"stopped after step {step + 1}; continue with --resume")
        return {}
    if start < args.steps:
        ckpt.save(args.steps, trained, optimizer)
    model.eval()
    scores = evaluate(model, tokenizer, n=args.eval_images) if args.eval_images else {}
    print(json.dumps({"step": args.steps, **scores}))
    if args.export is not None:
        export(model, args.export, {"steps": args.steps, **scores})
    return scores


if __name__ == "__main__":
    main()
