"""Zero-shot classification from class names: what a CLIP model knew before fine-tuning, and what it kept.

    data = load_zeroshot_data("imagenet-val/", classnames="classnames.tsv")
    result = evaluate_zeroshot(view_of(model), data, templates=["a photo of a {}."])
    result["top1"], result["abstain_rate"]        # the latter for HALO models

The protocol of CLIP_benchmark's zero-shot classification: each class's
prototype is built from its name in every prompt template, each image is
assigned to the nearest prototype, top-1 / top-5 accuracy are reported.

- CLIP (:class:`~halo_embed.clip.evaluate.CosineView`): a class's prototype is
  the L2-normalised mean of the L2-normalised template embeddings; images are
  ranked by cosine. Rejection score against OOD images: MCM (maximum softmax
  of the cosines at temperature 1, Ming et al. 2022).
- HALO (:class:`~halo_embed.clip.evaluate.HALOView`): a class's prototype is
  the mean of the adapted template embeddings (HALO's geometry is Euclidean,
  as in :class:`~halo_embed.clip.PrototypeClassifier`; with the ``"sphere"``
  adapter the mean is put back on the sphere, so that the ranking is exactly
  the cosine rule's above); images are assigned by
  the nearest prototype in HALO's geometry; an image abstains when its
  nearest class's prompt fails the model's pair decision
  (:class:`~halo_embed.clip.decision.PairDecision`, the rule that accepts or
  rejects a caption), so the report also has the abstain rate and the
  rejection of OOD images by that prompt's ``p(aligned)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import geometry
from .._validation import check_int
from .prototype import DEFAULT_TEMPLATES

__all__ = ["ZeroShotData", "class_prototypes", "evaluate_zeroshot", "load_zeroshot_data",
           "read_classnames", "read_templates"]

@dataclass
class ZeroShotData:
    """``images``: paths or PIL images; ``labels``: ``(N,)`` class indices into ``classnames``."""

    images: list[Any]
    labels: Tensor
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.images)


def read_classnames(path: str | Path) -> dict[str, str] | list[str]:
    """A class-names file: ``key<TAB>name`` lines (e.g. ``n01443537<TAB>goldfish``) give a mapping from
    folder names or CSV labels; lines of names alone give the names in label order (0, 1, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"class names file {path} is empty")
    if all("\t" in line for line in lines):
        mapping = {}
        for line in lines:
            key, name = line.split("\t", 1)
            mapping[key.strip()] = name.strip()
        return mapping
    if any("\t" in line for line in lines):
        raise ValueError(f"class names file {path}: either every line is 'key<TAB>name' or none is")
    return [line.strip() for line in lines]


def read_templates(values: Sequence[str]) -> list[str]:
    """Prompt templates given as strings with ``{}``, or one file with a template per line."""
    values = list(values)
    if len(values) == 1 and "{}" not in values[0]:
        path = Path(values[0])
        if not path.is_file():
            raise ValueError(f"templates must contain '{{}}' or be a file of templates, got {values[0]!r}")
        values = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not values or not all(isinstance(t, str) and "{}" in t for t in values):
        raise ValueError(f"every template must contain '{{}}' for the class name, got {values!r}")
    for template in values:
        try:
            template.format("class name")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"template {template!r} is not a format string with one '{{}}' for the class name "
                             f"({type(error).__name__}: {error}); write a literal brace as '{{{{' or '}}}}'") from None
    return values


def load_zeroshot_data(path: str | Path, classnames: str | Path | None = None, limit: int | None = None,
                       seed: int = 0, img_key: str | None = None, label_key: str | None = None) -> ZeroShotData:
    """Labelled images from an image folder (``<root>/<class>/<image>``) or a CSV/TSV with an image-path
    column (``filepath`` or ``image``) and a label column (``label`` or ``class``).

    Args:
        path: the folder or the table (relative image paths are relative to the table's folder).
        classnames: optional file for :func:`read_classnames`; by default the
            folder names (``_`` read as spaces) or the CSV labels are the names.
        limit: at most this many images, a seeded random subset (``None``: all).
        seed: the subset's seed.

    Raises:
        FileNotFoundError / ValueError: a missing path, no images, a label without a name.
    """
    from ..data.collections import class_folders
    from ..data.tables import read_csv

    path = Path(path)
    if limit is not None:
        limit = check_int("limit", limit, minimum=1)
    if path.is_dir():
        keys, items = class_folders(path)
        files = [str(p) for p, _ in items]
        labels = [label for _, label in items]
    elif path.is_file():
        rows, (image_col, label_col) = read_csv(path, [(img_key or ("filepath", "image"), "the image column"),
                                                       (label_key or ("label", "class"), "the label column")])
        bad = [row for row in rows if row.error]
        if bad:
            raise ValueError(f"{path}, line {bad[0].line}: {bad[0].error}")
        keys = sorted({row.values[label_col].strip() for row in rows},
                      key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
        index = {key: i for i, key in enumerate(keys)}
        files = [str((path.parent / row.values[image_col].strip())) for row in rows]
        labels = [index[row.values[label_col].strip()] for row in rows]
    else:
        raise FileNotFoundError(f"zero-shot data not found (an image folder or a CSV): {path}")
    if not files:
        raise ValueError(f"{path} has no images")
    names = [key.replace("_", " ") for key in keys]
    if classnames is not None:
        given = read_classnames(classnames)
        if isinstance(given, dict):
            missing = [key for key in keys if key not in given]
            if missing:
                raise ValueError(f"class names file {classnames} has no name for {missing[:3]}"
                                 f"{' ...' if len(missing) > 3 else ''}")
            names = [given[key] for key in keys]
        else:
            if len(given) != len(keys):
                raise ValueError(f"class names file {classnames} has {len(given)} names, the data {len(keys)} classes")
            names = given
    order = list(range(len(files)))
    if limit is not None and limit < len(order):
        order = sorted(random.Random(seed).sample(order, limit))
    return ZeroShotData([files[i] for i in order], torch.tensor([labels[i] for i in order]), names)


@torch.no_grad()
def class_prototypes(view, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     device: str | torch.device = "cpu", batch_size: int = 256) -> Tensor:
    """``(C, D)`` class prototypes in the view's geometry (see the module docstring)."""
    from .evaluate import embed_texts

    prompts = [t.format(name) for name in classnames for t in templates]
    per_template = embed_texts(view, prompts, device, batch_size).view(len(classnames), len(templates), -1)
    if view.metric == "cosine":
        return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
    return view.model.adapter.prototype(per_template.mean(dim=1))


def evaluate_zeroshot(view, data: ZeroShotData, templates: Sequence[str] = DEFAULT_TEMPLATES,
                      device: str | torch.device = "cpu", ood: dict[str, Sequence[Any]] | None = None,
                      batch_size: int = 128, workers: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of zero-shot classification (and for HALO the abstain rate), and the
    rejection of each OOD image set by the view's score (AUROC, FPR@95).

    Args:
        view: :func:`~halo_embed.clip.evaluate.view_of` a model.
        data: :class:`ZeroShotData`.
        templates: prompt templates with ``{}``.
        ood: name -> images (PIL or paths) that belong to none of the classes.

    Returns:
        ``top1``, ``top5``, ``images``, ``classes``, ``rule`` (``"cosine"`` or
        ``"halo"``); for HALO ``abstain_rate``, ``accepted_top1`` (accuracy of
        the images it does not abstain on), ``temperature`` and ``decision``;
        ``ood``: name -> :func:`~halo_embed.eval.ood_metrics` of the rejection
        score, ``tuned_threshold_accuracy`` (balanced accuracy on the odd half
        of the images, threshold tuned on the even half) and for HALO
        ``abstain_rate`` and ``builtin_decision_accuracy`` (the decision's
        balanced accuracy on the odd half, nothing tuned).
    """
    from ..eval import best_threshold, ood_metrics, threshold_accuracy

    if not isinstance(data, ZeroShotData):
        raise TypeError(f"data must be a ZeroShotData, got {type(data).__name__}")
    templates = read_templates(templates)
    from .evaluate import embed_images

    prototypes = class_prototypes(view, data.classnames, templates, device, batch_size)
    transform = view.backbone.image_transform(train=False)
    images = embed_images(view, data.images, transform, device, batch_size, workers)
    ood_images = {name: embed_images(view, items, transform, device, batch_size, workers)
                  for name, items in (ood or {}).items()}
    result: dict[str, Any] = {"images": len(data), "classes": len(data.classnames), "templates": len(templates)}
    if view.metric == "cosine":
        result["rule"] = "cosine"

        def scores_of(embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            logits = embeddings @ prototypes.T
            return logits, torch.softmax(logits, dim=-1).max(dim=-1).values, None  # MCM at temperature 1
    else:
        model = view.model
        decision = model.decision
        temperature = model.temperature.detach().cpu()
        result.update(rule="halo", temperature=float(temperature), decision=decision.to_dict())

        def scores_of(embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            # the nearest prototype is the prediction; the image abstains when that class's prompt fails the
            # model's pair decision (the rule that accepts or rejects a caption), and p(aligned) ranks OOD
            logits = geometry.shifted_logits(embeddings, prototypes, temperature)
            nearest = prototypes[logits.argmax(dim=-1)]
            _, probability, accept = decision.judge_pairs(embeddings, nearest)
            return logits, probability, ~accept

    logits, id_scores, abstained = scores_of(images)
    top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices
    correct = top5[:, 0] == data.labels
    result["top1"] = float(correct.float().mean())
    result["top5"] = float((top5 == data.labels[:, None]).any(dim=-1).float().mean())
    if abstained is not None:
        result["abstain_rate"] = float(abstained.float().mean())
        accepted = ~abstained
        result["accepted_top1"] = float(correct[accepted].float().mean()) if bool(accepted.any()) else None
    result["ood"] = {}
    for name, embeddings in ood_images.items():
        _, ood_scores, ood_abstained = scores_of(embeddings)
        known, unknown = id_scores.numpy(), ood_scores.numpy()
        metrics = ood_metrics(known, unknown)
        # as for pairs: a threshold tuned on the even half of the test images, accuracies on the odd half
        threshold, _ = best_threshold(known[0::2], unknown[0::2])
        metrics["tuned_threshold_accuracy"] = threshold_accuracy(known[1::2], unknown[1::2], threshold)
        if ood_abstained is not None:
            metrics["abstain_rate"] = float(ood_abstained.float().mean())
            metrics["builtin_decision_accuracy"] = 0.5 * (float((~abstained[1::2]).float().mean())
                                                          + float(ood_abstained[1::2].float().mean()))
        result["ood"][name] = metrics
    return result
