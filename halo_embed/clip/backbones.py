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
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .feature_cache import FeatureCache, module_fingerprint

__all__ = ["FAMILIES", "PREPROCESS_OVERRIDES", "CLIPBackbone", "HFCLIPBackbone", "LockedSplit", "OpenCLIPBackbone",
           "export_open_clip", "load_backbone", "move_tokens", "rebuild_backbone"]

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


@dataclass
class LockedSplit:
    """A tower as ``head(prefix(inputs))`` where ``prefix`` (held in ``module``) is locked.

    Attributes:
        prefix: ``inputs -> (B, F)``: the locked part.
        head: ``(B, F) -> (B, D)``: what follows it (identity when the whole tower is locked).
        module: the module holding the prefix's weights (hashed for the cache; kept in eval mode).
        name: describes the split (part of the cache's namespace).
        whole: the prefix is the whole tower.
    """

    prefix: Callable[[Any], Tensor]
    head: Callable[[Tensor], Tensor]
    module: nn.Module
    name: str
    whole: bool = False


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
    #: the cache of locked tower parts (:meth:`attach_feature_cache`), and the towers it serves
    feature_cache: FeatureCache | None = None
    cached_towers: tuple[str, ...] = ()

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, D)`` un-normalised image features."""
        if self.input_dtype is not None:
            pixel_values = pixel_values.to(self.input_dtype)
        return self._encode("image", pixel_values, self._encode_image)

    def encode_text(self, tokens: Tokens) -> Tensor:
        """Tokens from :meth:`tokenize` ``-> (B, D)`` un-normalised text features."""
        return self._encode("text", tokens, self._encode_text)

    @abc.abstractmethod
    def _encode_image(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    @abc.abstractmethod
    def _encode_text(self, tokens: Tokens) -> Tensor:
        raise NotImplementedError

    def _encode(self, tower: str, inputs: Any, full: Callable[[Any], Tensor]) -> Tensor:
        if self.feature_cache is None or tower not in self.cached_towers:
            return full(inputs)
        split = self.locked_split(tower)
        if split is None:  # unlocked since the cache was attached: nothing may be cached
            return full(inputs)
        return split.head(self.locked_features(tower, inputs))

    def locked_features(self, tower: str, inputs: Any) -> Tensor:
        """The output of ``tower``'s locked part (:meth:`locked_split`) for ``inputs`` (pixels after the
        image transform, or tokens), from the feature cache where one is attached; ``split.head`` of it is
        the tower's output. For training what follows a locked tower on its features directly.

        Raises:
            ValueError: ``tower`` has no locked part.
        """
        split = self.locked_split(tower)
        if split is None:
            raise ValueError(f"the {tower} tower has no locked part: lock it first (lock_{tower})")
        if self.input_dtype is not None and tower == "image":
            inputs = inputs.to(self.input_dtype)
        if self.feature_cache is None:
            with torch.no_grad():
                return split.prefix(inputs)
        namespace = self._cache_namespaces.get(tower)
        if namespace is None:
            namespace = self._cache_namespaces[tower] = f"{tower}-{module_fingerprint(split.module, split.name)}"
        return self.feature_cache.features(namespace, inputs, split.prefix)

    def locked_split(self, tower: str) -> LockedSplit | None:
        """The locked part of ``tower`` (``"image"`` or ``"text"``) and what follows it, or ``None``.

        The whole tower when none of its weights trains; a backbone may also
        name a frozen trunk followed by a trainable head. ``None`` when any
        weight before the head trains. A locked part runs in evaluation mode
        (:meth:`train`) and its outputs may be cached (:meth:`attach_feature_cache`).
        """
        module = self._tower_module(tower)
        if module is not None and not any(p.requires_grad for p in module.parameters()):
            encode = self._encode_image if tower == "image" else self._encode_text
            return LockedSplit(encode, lambda x: x, module, f"{type(self).__name__}.{tower}", whole=True)
        return None

    def _tower_module(self, tower: str) -> nn.Module | None:
        """The module holding every weight of ``tower`` (for :meth:`locked_split`)."""
        return None

    def attach_feature_cache(self, cache: FeatureCache | None, towers: Sequence[str] = ("image", "text")) -> None:
        """Serve the locked part of each of ``towers`` from ``cache`` (``None`` detaches).

        Only deterministic inputs should go through a cached tower: the
        recipe leaves ``"image"`` out while training with random augmentation.
        """
        unknown = [t for t in towers if t not in ("image", "text")]
        if unknown:
            raise ValueError(f"towers must be 'image' and/or 'text', got {unknown}")
        self.feature_cache = cache
        self.cached_towers = tuple(towers) if cache is not None else ()
        self._cache_namespaces = {}

    def train(self, mode: bool = True) -> "CLIPBackbone":
        """As :meth:`torch.nn.Module.train`, but a locked tower part stays in evaluation mode: it is a fixed
        function (as in LiT), so no dropout and no BatchNorm batch statistics (nor updates of them)."""
        super().train(mode)
        if mode:
            for tower in ("image", "text"):
                split = self.locked_split(tower)
                if split is not None:
                    split.module.eval()
        return self

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


def _freeze_locked_batch_norms(module: nn.Module) -> None:
    """Replace every BatchNorm of ``module`` whose weights are frozen by timm's frozen equivalent (statistics
    fixed; ``BatchNormAct2d`` keeps its activation)."""
    from timm.layers import freeze_batch_norm_2d

    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in child.parameters()):
            setattr(module, name, freeze_batch_norm_2d(child))
        else:
            _freeze_locked_batch_norms(child)


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
                        pretrained_image: str | os.PathLike | None = None, **kwargs: Any) -> "OpenCLIPBackbone":
        """Build the model as ``open_clip.create_model_and_transforms`` does.

        Args:
            model_name / pretrained: see the class docstring.
            precision: open_clip's weight precisions (``fp16``, ``bf16``,
                ``pure_fp16``, ``pure_bf16``) as open_clip applies them; anything
                else (``fp32``, the ``amp*`` autocast modes) keeps fp32 weights.
            pretrained_image: a weights file for a timm image tower's trunk
                (open_clip_train's ``--pretrained-image``, from a file:
                :func:`~halo_embed.clip.tower_weights.load_image_tower_weights`),
                loaded after the model is built.
            kwargs: further ``create_model_and_transforms`` arguments, e.g. the
                preprocessing overrides ``image_mean``, ``image_std``,
                ``image_interpolation``, ``image_resize_mode`` (which a
                checkpoint saves in its ``preprocess_cfg``).
        """
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
        if model_name.startswith("local-dir:"):
            kwargs.update(_local_text_tower(Path(model_name[len("local-dir:"):])))
        # random weights are the point of halo-embed's built-in architectures and of a config file;
        # for any other architecture open_clip's warning tells a user who forgot --pretrained
        by_design = pretrained is None and (is_config_file or (BUILTIN_CONFIGS / f"{model_name}.json").is_file())
        with _quiet_random_init_warning() if by_design else contextlib.nullcontext():
            model, train_tf, val_tf = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision=precision if precision in WEIGHT_DTYPES else "fp32",
                **kwargs)
        if pretrained_image is not None:
            from .tower_weights import load_image_tower_weights

            load_image_tower_weights(model.visual, pretrained_image)
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config for {model_name!r}")
        if "text_cfg" in kwargs:
            model_cfg = {**model_cfg, "text_cfg": kwargs["text_cfg"]}
        from open_clip.model import get_model_preprocess_cfg

        tokenizer = open_clip.get_tokenizer(model_name)
        backbone = cls(model, train_tf, val_tf, tokenizer, model_cfg, dict(get_model_preprocess_cfg(model)),
                       model_name)
        backbone.input_dtype = WEIGHT_DTYPES.get(precision)
        return backbone

    def _encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values, normalize=False)

    def _encode_text(self, tokens: Tokens) -> Tensor:
        return self.model.encode_text(tokens, normalize=False)

    def _tower_module(self, tower: str) -> nn.Module | None:
        if tower == "image":
            return self.model.visual
        text = getattr(self.model, "text", None)
        if text is not None:  # CustomTextCLIP: the text tower is one module
            return text
        # CLIP: the text tower's parts are attributes of the model itself
        parts = nn.ModuleDict({name: module for name in ("token_embedding", "transformer", "ln_final")
                               if isinstance(module := getattr(self.model, name, None), nn.Module)})
        for name in ("positional_embedding", "text_projection"):  # parameters, not modules
            value = getattr(self.model, name, None)
            if isinstance(value, nn.Parameter):
                parts.register_parameter(name, value)
            elif isinstance(value, nn.Module):
                parts[name] = value
        return parts

    def locked_split(self, tower: str) -> LockedSplit | None:
        """The whole tower when it is locked; otherwise, for a timm image tower whose trunk is locked, the
        trunk (its ``head`` pools and projects), and for a Hugging Face text tower whose transformer is
        locked (LayerNorms included), the transformer and pooler (its ``proj`` projects)."""
        whole = super().locked_split(tower)
        if whole is not None:
            return whole
        frozen = lambda module: not any(p.requires_grad for p in module.parameters())  # noqa: E731
        if tower == "image":
            visual = self.model.visual
            trunk = getattr(visual, "trunk", None)
            if trunk is not None and frozen(trunk):
                return LockedSplit(trunk, visual.head, trunk, "timm-trunk")
            return None
        from open_clip.hf_model import HFTextEncoder

        text = getattr(self.model, "text", None)
        if isinstance(text, HFTextEncoder) and frozen(text.transformer):
            def pooled(tokens: Tensor) -> Tensor:  # HFTextEncoder.forward up to its projection
                mask = (tokens != text.config.pad_token_id).long()
                return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

            return LockedSplit(pooled, text.proj, text.transformer, f"hf-text:{type(text.pooler).__name__}")
        return None

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
        trunk = getattr(self.model.visual, "trunk", None)  # a timm tower
        try:
            # open_clip's BatchNorm freezing turns timm's BatchNormAct2d (BatchNorm + activation) into a plain
            # FrozenBatchNorm2d, silently dropping the activation; timm towers are frozen with timm's own
            self.model.lock_image_tower(unlocked_groups=unlocked_groups,
                                        freeze_bn_stats=freeze_bn_stats and trunk is None)
        except AssertionError as error:  # e.g. ModifiedResNet: "partial locking not currently supported"
            raise ValueError(f"open_clip cannot lock this image tower ({type(self.model.visual).__name__}) "
                             f"with unlocked_groups={unlocked_groups}: {error}") from None
        if freeze_bn_stats and trunk is not None:
            _freeze_locked_batch_norms(trunk)

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
        if "hf_model_name" in text_cfg and not (saved_text / "config.json").is_file():
            # a checkpoint carries its Hugging Face text tower's config and tokenizer; without them open_clip
            # would go to the hub for the name in the config: a scorer must not reach the network
            raise ValueError(f"{directory} is damaged: its Hugging Face text tower ({text_cfg['hf_model_name']}) "
                             f"has no saved config in {saved_text}")
        if "hf_model_name" in text_cfg:
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


def _local_text_tower(folder: Path) -> dict[str, Any]:
    """For a ``local-dir:`` model whose Hugging Face text tower names a folder that is not there (the model
    was moved or copied), the text tower's config from the model folder itself (``config.json``, as
    :func:`export_open_clip` writes it): the ``text_cfg`` override for ``create_model``."""
    try:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
        text_cfg = dict(config["model_cfg"]["text_cfg"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # open_clip reports a missing or broken config itself
    name = text_cfg.get("hf_model_name")
    if isinstance(name, str) and Path(name).is_absolute() and not Path(name).exists() \
            and (folder / "config.json").is_file():
        # the text tower's weights are in the folder's checkpoint, as open_clip loads a local-dir: model
        text_cfg.update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
        return {"text_cfg": text_cfg}
    return {}


def export_open_clip(backbone: "OpenCLIPBackbone", directory: str | os.PathLike) -> Path:
    """Save an open_clip backbone as a folder that ``open_clip.create_model_and_transforms("local-dir:DIR")``
    loads: ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``), ``open_clip_model.safetensors``
    and, for a Hugging Face text tower, its tokenizer files and config (open_clip reads a ``local-dir:``
    model's tokenizer from the folder; the config is read from ``hf_model_name``, which is set to the
    folder). Written into a staging folder and renamed: an existing folder is an error, never overwritten.

    Raises:
        FileExistsError: ``directory`` exists.
        TypeError: ``backbone`` is not an :class:`OpenCLIPBackbone`.
    """
    import shutil
    import uuid

    from safetensors.torch import save_file

    if not isinstance(backbone, OpenCLIPBackbone):
        raise TypeError(f"backbone must be an OpenCLIPBackbone, got {type(backbone).__name__}")
    directory = Path(directory).resolve()
    if directory.exists():
        raise FileExistsError(f"{directory} exists; export into a new folder")
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        model_cfg = json.loads(json.dumps(backbone.model_cfg))
        text_cfg = model_cfg.get("text_cfg", {})
        inner = getattr(backbone._tokenizer, "tokenizer", None)
        if "hf_model_name" in text_cfg:
            backbone.model.text.config.save_pretrained(staging)
            if hasattr(inner, "save_pretrained"):
                inner.save_pretrained(staging)
            text_cfg.update(hf_model_name=str(directory), hf_tokenizer_name=str(directory))
            text_cfg.pop("hf_model_pretrained", None)
        config = {"model_cfg": model_cfg, "preprocess_cfg": _jsonable(backbone.preprocess_cfg)}
        (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        save_file(state, str(staging / "open_clip_model.safetensors"))
        os.rename(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


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

    def _encode_image(self, pixel_values: Tensor) -> Tensor:
        return self._features(self.model.get_image_features(pixel_values=pixel_values))

    def _encode_text(self, tokens: Tokens) -> Tensor:
        return self._features(self.model.get_text_features(**tokens))

    def _tower_module(self, tower: str) -> nn.Module | None:
        modules = self._tower(tower)
        return nn.ModuleList(modules) if modules else None

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


#: open_clip's preprocessing overrides (open_clip_train's --image-mean, --image-std, --image-interpolation,
#: --image-resize-mode): create_model_and_transforms' argument names
PREPROCESS_OVERRIDES = ("image_mean", "image_std", "image_interpolation", "image_resize_mode")


def load_backbone(family: str, name: str, pretrained: str | None = None, precision: str = "fp32",
                  pretrained_image: str | os.PathLike | None = None, **kwargs: Any) -> CLIPBackbone:
    """Build a backbone the way each library's users do.

    Args:
        family: ``"open_clip"`` or ``"transformers"``.
        name: open_clip architecture / ``hf-hub:`` / ``local-dir:`` name, or an
            HF hub id or local folder.
        pretrained: open_clip only: a tag or a local checkpoint file.
        precision: open_clip's ``--precision`` value; ``fp16``, ``bf16``,
            ``pure_fp16`` and ``pure_bf16`` hold the weights in half precision
            (see each class's ``from_pretrained``), others keep fp32.
        pretrained_image: open_clip only: a weights file for a timm image tower
            (see :meth:`OpenCLIPBackbone.from_pretrained`).
        kwargs: passed on; for open_clip e.g. :data:`PREPROCESS_OVERRIDES`
            (``None`` values are left out).

    Raises:
        ValueError: unknown family or precision, or an open_clip-only option given for transformers.
    """
    if family not in _CLASSES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if precision not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {list(PRECISION_NAMES)}, got {precision!r}")
    kwargs = {k: v for k, v in kwargs.items() if not (k in PREPROCESS_OVERRIDES and v is None)}
    if family == "transformers":
        given = [k for k in ("pretrained", "pretrained_image", *PREPROCESS_OVERRIDES)
                 if (k in kwargs or {"pretrained": pretrained, "pretrained_image": pretrained_image}.get(k))]
        if given:
            raise ValueError(f"{given[0]} is an open_clip option; a transformers model brings its weights and image "
                             "processor from its hub id or folder")
        return HFCLIPBackbone.from_pretrained(name, precision=precision, **kwargs)
    return OpenCLIPBackbone.from_pretrained(name, pretrained=pretrained, precision=precision,
                                            pretrained_image=pretrained_image, **kwargs)


def rebuild_backbone(spec: dict[str, Any], directory: Path) -> CLIPBackbone:
    """The architecture described by :meth:`CLIPBackbone.spec`, with random weights and no download."""
    family = spec.get("family")
    if family not in _CLASSES:
        raise ValueError(f"unknown backbone family {family!r} in the checkpoint's config.json")
    return _CLASSES[family].rebuild(spec, directory)
