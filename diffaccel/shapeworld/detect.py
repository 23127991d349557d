"""Find ShapeWorld objects in a batch of images, vectorized in torch (no scipy, no OpenCV).

1. Resize to a fixed working size and smooth 3x3 (tames pixel noise).
2. Label pixels by color: in CIELAB, a pixel takes the nearest palette color if it is closer to
   it than to the image's background (the median of its border) and within ``color_threshold``.
3. Connected components of equal labels (4-connectivity) by min-label propagation with pointer
   jumping, all images and colors at once.
4. Per component: area, centroid and spread; components below ``min_area`` are noise.
5. Shape: each template (circle, square, triangle, each also blurred and re-thresholded at two
   strengths, as segmenting a blurred render gives) is placed where the component's centroid and
   spread put it -- robust to rounded corners and cut tips, unlike the bounding box -- and
   compared with the component's mask (soft IoU on a 24x24 grid). The best template names the
   shape if its IoU reaches ``min_iou`` and its aspect ratio is within ``max_aspect``; otherwise
   the shape is ``None``.

Example:
    >>> from diffaccel.shapeworld import Scene, ShapeObject, Verifier, render
    >>> image = render(Scene((ShapeObject("triangle", "orange", 0.3, 0.6, 0.3),)))
    >>> [(d.color, d.shape) for d in Verifier().detect([image])[0]]
    [('orange', 'triangle')]
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .scenes import COLORS, SHAPES

_TEMPLATE_SIZE = 24
_TEMPLATE_BLURS = (0.0, 0.07, 0.14)  # Gaussian sigma, as a fraction of the shape's side


@dataclass(frozen=True)
class Detection:
    """One object found in an image: color, shape (``None`` if no template fits), centroid
    ``(x, y)`` and area as fractions of the image, and the best template IoU."""

    color: str
    shape: str | None
    x: float
    y: float
    area: float
    iou: float


def _srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) sRGB in [0, 1] -> CIELAB (D65)."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=rgb.dtype,
    )
    xyz = torch.einsum("ij,...jhw->...ihw", m, linear)
    xyz = xyz / torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype).view(3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


@lru_cache(maxsize=1)
def _palette_lab() -> torch.Tensor:
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255.0
    return _srgb_to_lab(rgb.T[:, :, None]).squeeze(-1).T  # (K, 3)


@lru_cache(maxsize=1)
def _templates() -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (S * B, G, G) of each shape filling the unit square, blurred by each of the
    ``_TEMPLATE_BLURS`` and thresholded at one half (what segmenting a blurred render gives),
    drawn in a window twice the square's side ([-0.5, 1.5]^2); and each mask's centroid and
    standard deviations ``(cx, cy, sx, sy)`` (S * B, 4) in unit-square coordinates."""
    big = _TEMPLATE_SIZE * 8
    box = (big // 2, big // 2, big // 2 + big - 1, big // 2 + big - 1)
    ys, xs = (np.mgrid[: 2 * big, : 2 * big] + 0.5) / big - 0.5
    masks, moments = [], []
    for shape in SHAPES:
        image = Image.new("L", (2 * big, 2 * big), 0)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse(box, fill=255)
        elif shape == "square":
            draw.rectangle(box, fill=255)
        else:
            draw.polygon(
                [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=255
            )
        for blur in _TEMPLATE_BLURS:
            blurred = image.filter(ImageFilter.GaussianBlur(blur * big)) if blur else image
            fine = (np.asarray(blurred, np.float64) >= 128).astype(np.float64)
            area = fine.sum()
            cx, cy = (fine * xs).sum() / area, (fine * ys).sum() / area
            sx = np.sqrt((fine * (xs - cx) ** 2).sum() / area)
            sy = np.sqrt((fine * (ys - cy) ** 2).sum() / area)
            moments.append([cx, cy, sx, sy])
            small = Image.fromarray((fine * 255).astype(np.uint8)).resize(
                (_TEMPLATE_SIZE, _TEMPLATE_SIZE), Image.Resampling.BOX
            )
            masks.append(torch.from_numpy(np.asarray(small, np.float32) / 255.0))
    return torch.stack(masks), torch.tensor(moments, dtype=torch.float32)


def _components(labels: torch.Tensor) -> torch.Tensor:
    """Connected components of equal non-negative labels in (N, H, W): each pixel gets the
    smallest flat index of its component (background pixels keep their own index)."""
    n, h, w = labels.shape
    ids = torch.arange(h * w).view(1, h, w).repeat(n, 1, 1)
    big = h * w
    right = (labels[:, :, :-1] == labels[:, :, 1:]) & (labels[:, :, 1:] >= 0)
    down = (labels[:, :-1, :] == labels[:, 1:, :]) & (labels[:, 1:, :] >= 0)
    while True:
        new = ids.clone()
        torch.minimum(new[:, :, :-1], torch.where(right, ids[:, :, 1:], big), out=new[:, :, :-1])
        torch.minimum(new[:, :, 1:], torch.where(right, ids[:, :, :-1], big), out=new[:, :, 1:])
        torch.minimum(new[:, :-1, :], torch.where(down, ids[:, 1:, :], big), out=new[:, :-1, :])
        torch.minimum(new[:, 1:, :], torch.where(down, ids[:, :-1, :], big), out=new[:, 1:, :])
        flat = new.view(n, -1)
        flat = torch.gather(flat, 1, torch.gather(flat, 1, flat))  # pointer jumping
        new = flat.view(n, h, w)
        if torch.equal(new, ids):
            return new
        ids = new


def prepare(images, size: int) -> torch.Tensor:
    """Images (list of PIL, uint8 or float numpy (N, H, W, 3), float tensor (N, 3, H, W) in
    [0, 1]) -> float32 tensor (N, 3, size, size) in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            return torch.zeros(0, 3, size, size)
        return torch.cat([prepare(_pil_to_tensor(im), size) for im in images])
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be (N, H, W, 3), got shape {images.shape}")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / scale
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be PIL images, a numpy array or a tensor, got {type(images)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"tensor images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    images = images.detach().to("cpu", torch.float32).clamp(0, 1)
    if images.shape[-2:] != (size, size):
        shrinking = images.shape[-1] > size
        images = F.interpolate(images, (size, size), mode="area" if shrinking else "bilinear")
    return images


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    array = np.asarray(image.convert("RGB"), np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def _detect(
    images: torch.Tensor,
    *,
    color_threshold: float,
    min_area: float,
    min_iou: float,
    max_aspect: float,
) -> list[list[Detection]]:
    """Objects in prepared images (N, 3, S, S) in [0, 1]; one list per image, largest first."""
    n, _, h, w = images.shape
    if n == 0:
        return []
    smooth = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    lab = _srgb_to_lab(smooth)  # (N, 3, H, W)
    border = torch.cat(
        [
            lab[..., :2, :].flatten(2),
            lab[..., -2:, :].flatten(2),
            lab[..., :, :2].flatten(2),
            lab[..., :, -2:].flatten(2),
        ],
        dim=2,
    )
    background = border.median(dim=2).values  # (N, 3)
    palette = _palette_lab()
    d_palette = (  # squared distances (N, K, H, W)
        (lab * lab).sum(1, keepdim=True)
        - 2 * torch.einsum("kc,nchw->nkhw", palette, lab)
        + (palette * palette).sum(1)[None, :, None, None]
    )
    d_background = ((lab - background[:, :, None, None]) ** 2).sum(1)
    d_min, labels = d_palette.min(dim=1)
    labels = torch.where((d_min < color_threshold**2) & (d_min < d_background), labels, -1)
    roots = _components(labels).view(n, -1)
    flat_labels = labels.view(n, -1)

    key = (torch.arange(n)[:, None] * (h * w) + roots).view(-1)
    valid = (flat_labels >= 0).view(-1)
    counts = torch.bincount(key[valid], minlength=n * h * w)
    key = torch.nonzero(counts >= max(min_area * h * w, 1)).view(-1)
    counts = counts[key]
    if key.numel() == 0:
        return [[] for _ in range(n)]
    image_of, root_of = key // (h * w), key % (h * w)
    members = roots[image_of] == root_of[:, None]  # (C, H*W)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    xs, ys = xs.reshape(-1).float(), ys.reshape(-1).float()
    m = members.float()
    cx, cy = (m @ xs) / counts, (m @ ys) / counts
    # Each shape hypothesis is placed where the component's centroid and spread say it would
    # be (robust to blurred corners, unlike the bounding box), and the component's mask is
    # resampled over that hypothesis' window and compared with its template.
    templates, moments = _templates()  # (S * B, G, G), (S * B, 4)
    var_x = (m @ (xs * xs)) / counts - cx * cx + 1 / 12  # + a pixel's own variance
    var_y = (m @ (ys * ys)) / counts - cy * cy + 1 / 12
    box_w = var_x.sqrt()[:, None] / moments[None, :, 2]  # (C, S) unit-square side, in pixels
    box_h = var_y.sqrt()[:, None] / moments[None, :, 3]
    left = cx[:, None] - moments[None, :, 0] * box_w
    top = cy[:, None] - moments[None, :, 1] * box_h
    u = ((torch.arange(_TEMPLATE_SIZE) + 0.5) / _TEMPLATE_SIZE) * 2 - 0.5  # window coordinates
    gx = left[..., None] + u * box_w[..., None]  # (C, S, G) pixel coordinates
    gy = top[..., None] + u * box_h[..., None]
    grid = torch.stack(
        [
            ((gx + 0.5) / w * 2 - 1)[:, :, None, :].expand(-1, -1, _TEMPLATE_SIZE, -1),
            ((gy + 0.5) / h * 2 - 1)[:, :, :, None].expand(-1, -1, -1, _TEMPLATE_SIZE),
        ],
        dim=-1,
    )
    n_shapes = len(templates)
    crops = F.grid_sample(
        m.view(-1, 1, h, w), grid.flatten(1, 2), mode="bilinear", align_corners=False
    ).view(-1, n_shapes, _TEMPLATE_SIZE, _TEMPLATE_SIZE)
    inter = torch.minimum(crops, templates[None]).sum((-1, -2))
    union = torch.maximum(crops, templates[None]).sum((-1, -2))
    iou, chosen = (inter / union).max(dim=1, keepdim=True)
    iou, best = iou.squeeze(1), chosen.squeeze(1) // len(_TEMPLATE_BLURS)
    aspect = (box_w.gather(1, chosen) / box_h.gather(1, chosen)).squeeze(1)
    recognized = (iou >= min_iou) & (torch.maximum(aspect, 1 / aspect) <= max_aspect)

    color_names, results = list(COLORS), [[] for _ in range(n)]
    color_of = flat_labels[image_of, root_of]
    order = torch.argsort(counts, descending=True, stable=True)
    for c in order.tolist():
        results[int(image_of[c])].append(
            Detection(
                color=color_names[int(color_of[c])],
                shape=SHAPES[int(best[c])] if recognized[c] else None,
                x=float(cx[c] + 0.5) / w,
                y=float(cy[c] + 0.5) / h,
                area=float(counts[c]) / (h * w),
                iou=float(iou[c]),
            )
        )
    return results


def detect(
    images,
    *,
    size: int,
    color_threshold: float,
    min_area: float,
    min_iou: float,
    max_aspect: float,
) -> list[list[Detection]]:
    """Objects in images (see :func:`prepare`) resized to ``size``; one list per image, largest
    first.

    Runs on one CPU thread: its tensors are small, and intra-op threads only add overhead (on a
    busy 2-core machine, 30x at batch 1). The caller's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _detect(
            prepare(images, size),
            color_threshold=color_threshold,
            min_area=min_area,
            min_iou=min_iou,
            max_aspect=max_aspect,
        )
    finally:
        torch.set_num_threads(threads)
