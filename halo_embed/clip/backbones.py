"""CLIP backbones from open_clip and from Hugging Face transformers, behind one interface.

    backbone = load_backbone("open_clip", "ViT-B-32", pretrained="laion2b_s34b_b79k")   # tag or local file
    backbone = load_backbone("open_clip", "local-dir:/models/my-clip")                  # open_clip folder
    backbone = load_backbone("transformers", "openai/clip-vit-base-patch32")            # hub id or local folder

Both families return **un-normalised** projected features: HALO needs the
norm (with L2-normalised features the origin sink is a constant). open_clip and
transformers are imported only here, and only when a backbone is built.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["FAMILIES", "CLIPBackbone", "HFCLIPBackbone", "OpenCLIPBackbone", "load_backbone", "move_tokens",
           "rebuild_backbone"]

FAMILIES = ("open_clip", "transformers")

#: Architectures halo-embed registers with open_clip (random init; for offline runs and the demo).
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def register_open_clip_configs(extra: str | Path | None = None) -> None:
    """Make halo-embed's built-in architectures (and an optional config JSON) known to open_clip."""
    import open_clip

    if str(BUILTIN_CONFIGS) not in {str(p) for p in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", [])}:
        open_clip.add_model_config(BUILTIN_CONFIGS)
    if extra is not None:
        open_clip.add_model_config(Path(extra))

Tokens = Any  # a LongTensor (open_clip) or a dict of tensors (transformers)


def move_tokens(tokens: Tokens, device: torch.device | str) -> Tokens:
    """Tokens from :meth:`CLIPBackbone.tokenize` on ``device`` (either form)."""
    if isinstance(tokens, dict):
        return {key: value.to(device) for key, value in tokens.items()}
    return tokens.to(device)


class CLIPBackbone(nn.Module, metaclass=abc.ABCMeta):
    """The interface the HALO CLIP model, the recipes and the scorer rely on (an abstract base class).

    ``context_length`` and ``_token_ids`` are optional: a backbone without
    them cannot tell which texts its tower truncates (the scorer reports
    ``None``).

    Attributes:
        family: ``"open_clip"`` or ``"transformers"``.
        embed_dim: ``D`` of the projected features.
    """

    family: str = ""
    embed_dim: int = 0

    @abc.abstractmethod
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)`` un-normalised image features."""
        raise NotImplementedError

    @abc.abstractmethod
    def encode_text(self, tokens: Tokens) -> Tensor:
        """Tokens from :meth:`tokenize` ``-> (B, D)`` un-normalised text features."""
        raise NotImplementedError

    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> Tokens:
        raise NotImplementedError

    def _token_ids(self, texts: list[str], length: int) -> Tensor:
        """``(B, length)`` token ids, truncated and padded to ``length`` the way :meth:`tokenize` does."""
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        """The number of tokens the text tower reads; longer texts are cut."""
        raise NotImplementedError

    def truncated(self, texts: list[str]) -> Tensor:
        """``(B,)`` bool: the text is longer than :attr:`context_length` tokens, so the tower sees a cut version.

        Tokenizer-agnostic: a text fits when tokenizing it one token longer only adds padding.
        """
        length = self.context_length
        return self._cut(self._token_ids(texts, length), texts, length)

    def tokenize_checked(self, texts: list[str]) -> tuple[Tokens, Tensor | None]:
        """:meth:`tokenize` and :meth:`truncated` with one tokenization less (``None``: cannot tell).

        The streaming scorer's workers call this once per batch.
        """
        tokens = self.tokenize(texts)
        try:
            length = self.context_length
            ids = tokens["input_ids"] if isinstance(tokens, dict) else tokens
            return tokens, self._cut(ids, texts, length)
        except NotImplementedError:
            return tokens, None

    def _cut(self, ids: Tensor, texts: list[str], length: int) -> Tensor:
        # ids at `length` equal the first `length` ids at `length + 1` unless the text did not fit
        return (self._token_ids(texts, length + 1)[:, :length] != ids).any(dim=1)

    @abc.abstractmethod
    def image_transform(self, train: bool = False) -> Callable:
        """PIL image -> ``(3, H, W)`` tensor, with training augmentation when ``train``."""
        raise NotImplementedError

    @abc.abstractmethod
    def lock_image(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower (LiT-style locking), leaving its last ``unlocked_groups`` layer groups
        trainable (open_clip's groups: stem, each block, last block + final norm, projection);
        ``freeze_bn_stats`` also fixes the BatchNorm statistics of the locked layers."""
        raise NotImplementedError

    @abc.abstractmethod
    def lock_text(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower, leaving its last ``unlocked_layers`` layer groups trainable;
        ``freeze_layer_norm=False`` leaves the LayerNorms of the locked layers trainable (Hugging Face
        text towers, as in open_clip)."""
        raise NotImplementedError

    #: the dtype pixels are cast to (the weights' half precision with --precision fp16/bf16/pure_*)
    input_dtype: torch.dtype | None = None

    @abc.abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`rebuild_backbone` recreates the architecture."""
        raise NotImplementedError

    @abc.abstractmethod
    def save_files(self, directory: Path) -> None:
        """Write the files the rebuild needs besides weights (configs, tokenizer)."""

    def contrastive_parameters(self) -> list[nn.Parameter]:
        """CLIP's own temperature (and SigLIP's bias): used by the contrastive losses, not by HALO."""
        return [p for name in ("logit_scale", "logit_bias")
                if isinstance(p := getattr(self.model, name, None), nn.Parameter)]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _check_lock_arguments(count_name: str, count: int, flag_name: str, flag: bool) -> tuple[int, bool]:
    from .._validation import check_bool, check_int

    return check_int(count_name, count, minimum=0), check_bool(flag_name, flag)


#: open_clip's --precision values
PRECISION_NAMES = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")
#: open_clip's --precision values that hold weights in half precision, and that dtype
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16,
                 "pure_bf16": torch.bfloat16}


@contextlib.contextmanager
def _quiet_random_init_warning():
    """Hide open_clip's "no pretrained weights loaded ... initialized randomly" while a checkpoint is rebuilt."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root, quiet = logging.getLogger(), _Filter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


class OpenCLIPBackbone(CLIPBackbone):
    """An open_clip ``CLIP``/``CustomTextCLIP`` model.

    Build with :meth:`from_pretrained`, which calls
    ``open_clip.create_model_and_transforms(model_name, pretrained=...)``:
    ``pretrained`` is a tag (downloads) or a local checkpoint file;
    ``model_name`` may be a built-in architecture, ``hf-hub:org/repo`` or
    ``local-dir:/path`` (a folder with ``open_clip_config.json`` and weights),
    halo-embed's built-in ``halo-tiny-vit`` (random init), or the path of an
    open_clip model-config JSON file (registered under its file name).
    """

    family = "open_clip"

    def __init__(self, model: nn.Module, train_transform: Callable, val_transform: Callable,
                 tokenizer: Callable, model_cfg: dict, preprocess_cfg: dict, name: str) -> None:
        super().__init__()
        self.model = model
        self._train_transform = train_transform
        self._val_transform = val_transform
        self._tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.embed_dim = int(model_cfg["embed_dim"])

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: str | None = None, precision: str = "fp32",
                        **kwargs: Any) -> "OpenCLIPBackbone":
        """``precision``: open_clip's weight precisions (``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16``) as
        open_clip applies them; anything else (``fp32``, the ``amp*`` autocast modes) keeps fp32 weights."""
        import open_clip

        is_config_file = model_name.endswith(".json")
        if is_config_file:
            path = Path(model_name)
            if not path.is_file():
                raise FileNotFoundError(f"model config file not found: {model_name}")
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"model config {model_name} is not valid JSON: {error}") from error
            register_open_clip_configs(model_name)
            model_name = path.stem
        else:
            register_open_clip_configs()
        schemes = ("hf-hub:", "local-dir:")
        if not model_name.startswith(schemes) and model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}: give an architecture name "
                             "(open_clip.list_models()), hf-hub:ORG/NAME, local-dir:FOLDER or a config .json file")
        # random weights are the point of halo-embed's built-in architectures and of a config file;
        # for any other architecture open_clip's warning tells a user who forgot --pretrained
        by_design = pretrained is None and (is_config_file or (BUILTIN_CONFIGS / f"{model_name}.json").is_file())
        with _quiet_random_init_warning() if by_design else contextlib.nullcontext():
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision=precision if precision in WEIGHT_DTYPES else "fp32",
                **kwargs)
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config for {model_name!r}")
        from open_clip.model import get_model_preprocess_cfg

        tokenizer = open_clip.get_tokenizer(model_name)
        backbone = cls(model, train_tf, val_tf, tokenizer, model_cfg, dict(get_model_preprocess_cfg(model)),
                       model_name)
        backbone.input_dtype = WEIGHT_DTYPES.get(precision)
        return backbone

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        if self.input_dtype is not None:
            pixel_values = pixel_values.to(self.input_dtype)
        return self.model.encode_image(pixel_values, normalize=False)

    def encode_text(self, tokens: Tokens) -> Tensor:
        return self.model.encode_text(tokens, normalize=False)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self._tokenizer(list(texts))

    def _token_ids(self, texts: list[str], length: int) -> Tensor:
        return self._tokenizer(list(texts), context_length=length)

    @property
    def context_length(self) -> int:
        return int(self._tokenizer.context_length)

    def image_transform(self, train: bool = False) -> Callable:
        return self._train_transform if train else self._val_transform

    def lock_image(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        unlocked_groups, freeze_bn_stats = _check_lock_arguments("unlocked_groups", unlocked_groups,
                                                                 "freeze_bn_stats", freeze_bn_stats)
        try:
            self.model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
        except AssertionError as error:  # e.g. ModifiedResNet: "partial locking not currently supported"
            raise ValueError(f"open_clip cannot lock this image tower ({type(self.model.visual).__name__}) "
                             f"with unlocked_groups={unlocked_groups}: {error}") from None

    def lock_text(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        unlocked_layers, freeze_layer_norm = _check_lock_arguments("unlocked_layers", unlocked_layers,
                                                                   "freeze_layer_norm", freeze_layer_norm)
        from open_clip.hf_model import HFTextEncoder

        if not isinstance(getattr(self.model, "text", None), HFTextEncoder):
            # open_clip's own text tower locks LayerNorms with their layer (it asserts on anything else)
            freeze_layer_norm = True
        self.model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def spec(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "embed_dim": self.embed_dim}

    def save_files(self, directory: Path) -> None:
        # The checkpoint folder doubles as an open_clip "local-dir:" folder (config only,
        # the weights live in model.safetensors), so open_clip rebuilds the architecture.
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": _jsonable(self.preprocess_cfg)}
        (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        inner = getattr(self._tokenizer, "tokenizer", None)
        if hasattr(inner, "save_pretrained"):  # an HF tokenizer behind open_clip
            inner.save_pretrained(directory / "tokenizer")
        text_config = getattr(getattr(self.model, "text", None), "config", None)
        if "hf_model_name" in self.model_cfg.get("text_cfg", {}) and hasattr(text_config, "save_pretrained"):
            # an HF text tower: keep its config too, so the rebuild needs neither the hub nor the original folder
            text_config.save_pretrained(directory / "tokenizer")

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "OpenCLIPBackbone":
        import open_clip
        from open_clip.model import get_model_preprocess_cfg

        source = f"local-dir:{directory}"
        overrides = {}
        saved_text = directory / "tokenizer"
        text_cfg = open_clip.get_model_config(source).get("text_cfg", {})
        if "hf_model_name" in text_cfg and (saved_text / "config.json").is_file():
            overrides["text_cfg"] = {**text_cfg, "hf_model_name": str(saved_text), "hf_tokenizer_name": str(saved_text),
                                     "hf_model_pretrained": False}
        with _quiet_random_init_warning():  # the weights come from model.safetensors right after
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                source, load_weights=False, pretrained_text=False, pretrained_image=False, **overrides
            )
        model_cfg = open_clip.get_model_config(source)
        if (directory / "tokenizer").is_dir():
            from open_clip.tokenizer import HFTokenizer

            tokenizer = HFTokenizer(str(directory / "tokenizer"), context_length=model_cfg["text_cfg"].get("context_length", 77))
        else:
            tokenizer = open_clip.get_tokenizer(source)
        return cls(model, train_tf, val_tf, tokenizer, model_cfg, dict(get_model_preprocess_cfg(model)), spec["name"])


def _jsonable(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _hf_image_transform(processor: Any, train: bool) -> Callable:
    """A torchvision pipeline equivalent to an HF CLIP image processor (faster, and the same in every worker)."""
    from torchvision import transforms as T

    size = processor.size or {}
    crop = processor.crop_size or size
    crop_hw = (crop.get("height", crop.get("shortest_edge")), crop.get("width", crop.get("shortest_edge")))
    resize = size.get("shortest_edge") or (size.get("height"), size.get("width"))
    mean, std = list(processor.image_mean), list(processor.image_std)
    to_rgb = T.Lambda(lambda image: image.convert("RGB"))
    if train:
        steps = [to_rgb, T.RandomResizedCrop(crop_hw, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    else:
        steps = [to_rgb, T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop_hw)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class HFCLIPBackbone(CLIPBackbone):
    """A Hugging Face model with ``get_image_features`` / ``get_text_features`` (CLIP, SigLIP, ...).

    Build with :meth:`from_pretrained(id_or_dir)`, which loads the model with
    ``AutoModel.from_pretrained`` and the tokenizer and image processor from
    the same place.
    """

    family = "transformers"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, name: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        config = model.config
        self.embed_dim = int(getattr(config, "projection_dim", 0) or config.text_config.hidden_size)
        text_config = getattr(config, "text_config", config)
        self.max_length = int(getattr(text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, model_id_or_dir: str, precision: str = "fp32", **kwargs: Any) -> "HFCLIPBackbone":
        """``precision``: ``fp16`` / ``bf16`` / ``pure_fp16`` / ``pure_bf16`` load the whole model in that
        dtype (transformers has no per-layer half precision like open_clip's fp16 / bf16); anything else
        keeps fp32 weights."""
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if precision in WEIGHT_DTYPES:
            kwargs.setdefault("dtype", WEIGHT_DTYPES[precision])
        model = AutoModel.from_pretrained(model_id_or_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_id_or_dir)
        processor = AutoImageProcessor.from_pretrained(model_id_or_dir)
        backbone = cls(model, tokenizer, processor, str(model_id_or_dir))
        backbone.input_dtype = WEIGHT_DTYPES.get(precision)
        return backbone

    @staticmethod
    def _features(output: Any) -> Tensor:
        # transformers < 5 returns the projected tensor, >= 5 an output whose pooler_output it is
        return output if isinstance(output, Tensor) else output.pooler_output

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        if self.input_dtype is not None:
            pixel_values = pixel_values.to(self.input_dtype)
        return self._features(self.model.get_image_features(pixel_values=pixel_values))

    def encode_text(self, tokens: Tokens) -> Tensor:
        return self._features(self.model.get_text_features(**tokens))

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def _token_ids(self, texts: list[str], length: int) -> Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                              return_tensors="pt")["input_ids"]

    @property
    def context_length(self) -> int:
        return self.max_length

    def image_transform(self, train: bool = False) -> Callable:
        return _hf_image_transform(self.image_processor, train)

    def _tower(self, kind: str) -> list[nn.Module]:
        model = self.model
        names = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}[kind]
        return [getattr(model, n) for n in names if getattr(model, n, None) is not None]

    def _groups(self, kind: str) -> list[list[nn.Module]]:
        """open_clip's layer groups of a CLIP-style tower: embeddings (+ pre-norm), each encoder layer, the
        last layer with the final norm, the projection."""
        model = self.model
        tower = getattr(model, "vision_model" if kind == "image" else "text_model", None)
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        if tower is None or not layers:
            raise ValueError(f"partial locking needs a CLIP-style {kind} tower with encoder layers; "
                             f"{type(model).__name__} has none")
        pick = lambda *names: [m for n in names if (m := getattr(tower, n, None)) is not None]  # noqa: E731
        first = pick("embeddings", "pre_layrnorm")
        last = [layers[-1], *pick("post_layernorm" if kind == "image" else "final_layer_norm")]
        projection = getattr(model, "visual_projection" if kind == "image" else "text_projection", None)
        return [first, *([layer] for layer in layers[:-1]), last] + ([[projection]] if projection is not None else [])

    def _lock(self, kind: str, unlocked: int) -> list[nn.Module]:
        """Freeze the tower, then unfreeze its last ``unlocked`` groups; returns the modules left frozen."""
        for module in self._tower(kind):
            _freeze(module)
        if not unlocked:
            return self._tower(kind)
        groups = self._groups(kind)
        for group in groups[-unlocked:]:
            for module in group:
                for p in module.parameters():
                    p.requires_grad_(True)
        return [module for group in groups[:-unlocked] for module in group]

    def lock_image(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        unlocked_groups, freeze_bn_stats = _check_lock_arguments("unlocked_groups", unlocked_groups,
                                                                 "freeze_bn_stats", freeze_bn_stats)
        frozen = self._lock("image", unlocked_groups)
        if freeze_bn_stats and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                   for module in frozen for m in module.modules()):
            raise ValueError("freeze_bn_stats is not supported for transformers image towers with BatchNorm")

    def lock_text(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        unlocked_layers, freeze_layer_norm = _check_lock_arguments("unlocked_layers", unlocked_layers,
                                                                   "freeze_layer_norm", freeze_layer_norm)
        frozen = self._lock("text", unlocked_layers)
        if not freeze_layer_norm:  # open_clip's Hugging Face text towers: LayerNorms of locked layers still train
            for module in frozen:
                for m in module.modules():
                    if isinstance(m, nn.LayerNorm):
                        for p in m.parameters():
                            p.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        prefix = "activation" if hasattr(self.model, "activation_checkpointing_enable") else "gradient"
        getattr(self.model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()

    def spec(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "embed_dim": self.embed_dim,
                "hf_config": self.model.config.to_dict()}

    def save_files(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory / "processor")
        self.image_processor.save_pretrained(directory / "processor")

    @classmethod
    def rebuild(cls, spec: dict[str, Any], directory: Path) -> "HFCLIPBackbone":
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        hf_config = dict(spec["hf_config"])
        config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        model = AutoModel.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(directory / "processor")
        processor = AutoImageProcessor.from_pretrained(directory / "processor")
        return cls(model, tokenizer, processor, spec["name"])


_CLASSES = {"open_clip": OpenCLIPBackbone, "transformers": HFCLIPBackbone}


def load_backbone(family: str, name: str, pretrained: str | None = None, precision: str = "fp32",
                  **kwargs: Any) -> CLIPBackbone:
    """Build a backbone the way each library's users do.

    Args:
        family: ``"open_clip"`` or ``"transformers"``.
        name: open_clip architecture / ``hf-hub:`` / ``local-dir:`` name, or an
            HF hub id or local folder.
        pretrained: open_clip only: a tag or a local checkpoint file.
        precision: open_clip's ``--precision`` value; ``fp16``, ``bf16``,
            ``pure_fp16`` and ``pure_bf16`` hold the weights in half precision
            (see each class's ``from_pretrained``), others keep fp32.

    Raises:
        ValueError: unknown family or precision, or ``pretrained`` given for transformers.
    """
    if family not in _CLASSES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if precision not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {list(PRECISION_NAMES)}, got {precision!r}")
    if family == "transformers":
        if pretrained is not None:
            raise ValueError("pretrained is an open_clip option; for transformers pass the hub id or folder as name")
        return HFCLIPBackbone.from_pretrained(name, precision=precision, **kwargs)
    return OpenCLIPBackbone.from_pretrained(name, pretrained=pretrained, precision=precision, **kwargs)


def rebuild_backbone(spec: dict[str, Any], directory: Path) -> CLIPBackbone:
    """The architecture described by :meth:`CLIPBackbone.spec`, with random weights and no download."""
    family = spec.get("family")
    if family not in _CLASSES:
        raise ValueError(f"unknown backbone family {family!r} in the checkpoint's config.json")
    return _CLASSES[family].rebuild(spec, directory)
