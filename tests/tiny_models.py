"""Real open_clip and transformers CLIP models from tiny configs, with random weights,
saved to disk so tests load them through the same paths users use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

OPEN_CLIP_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPEN_CLIP_PREPROCESS = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def open_clip_local_dir(directory: Path, seed: int = 0) -> Path:
    """An open_clip ``local-dir:`` folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_TINY, "preprocess_cfg": OPEN_CLIP_PREPROCESS})
    )
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{directory}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return directory


def open_clip_registered(directory: Path, name: str = "halo-test-tiny", seed: int = 0) -> tuple[str, Path]:
    """A tiny architecture registered under ``name`` and a weights file for ``pretrained=``."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(directory / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return name, weights


WORDS = (
    "a an the photo of red green blue yellow purple orange white black small large big tiny circle square "
    "triangle cross ring star in on at top bottom left right center middle corner dog cat car plane bird "
    "ship truck horse deer frog image picture shape"
).split()


def hf_clip_dir(directory: Path, seed: int = 0) -> Path:
    """A transformers CLIP folder (model, tokenizer, image processor) as ``save_pretrained`` writes it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    # A fixed word-level vocabulary (a trained one would depend on hash order between runs).
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *sorted(set(WORDS)), ".", ","])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.token_to_id("[PAD]")),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=24,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(directory)
    return directory


def tiny_bert_dir(directory: Path, seed: int = 0) -> Path:
    """A BERT sentence encoder folder (the MiniLM family's architecture) with a word-piece tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)),
                                                 ".", ","])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(directory)  # open_clip's mean pooler
    return directory


def efficientnet_pytorch_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm EfficientNet's weights renamed into the EfficientNet-PyTorch layout (how pretrained
    EfficientNet-Lite weights are distributed), written out here independently of halo-embed's converter."""
    stage_layers = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                    "conv_pwl": "_project_conv", "bn3": "_bn2"}
    first_stage = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    flat = {}
    for stage, blocks in enumerate(model.blocks):
        for inner in range(len(blocks)):
            flat[(stage, inner)] = len(flat)
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            stage, inner, layer = int(parts[1]), int(parts[2]), parts[3]
            names = first_stage if not hasattr(model.blocks[stage][inner], "conv_pwl") else stage_layers
            out[f"_blocks.{flat[(stage, inner)]}.{names[layer]}.{'.'.join(parts[4:])}"] = value.clone()
        else:
            top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
                   "classifier": "_fc"}[parts[0]]
            out[".".join([top, *parts[1:]])] = value.clone()
    return out


def lit_dual_encoder(directory: Path, seed: int = 0, image_size: int = 32) -> dict[str, Path]:
    """The pieces of a LiT-style dual encoder as a user has them: ImageNet-style EfficientNet-Lite0 weights in
    the EfficientNet-PyTorch layout (random here), a BERT text tower folder, and an open_clip model config
    JSON naming both (``vision_cfg.timm_model_name``, ``text_cfg.hf_model_name``)."""
    import timm

    directory.mkdir(parents=True, exist_ok=True)
    bert = tiny_bert_dir(directory / "bert", seed)
    torch.manual_seed(seed + 1)
    effnet = timm.create_model("tf_efficientnet_lite0")
    torch.save(efficientnet_pytorch_state(effnet), directory / "efficientnet-lite0.pth")
    config = {"embed_dim": 24,
              "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": image_size},
              "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                           "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16}}
    (directory / "lit-tiny.json").write_text(json.dumps(config))
    return {"config": directory / "lit-tiny.json", "image_weights": directory / "efficientnet-lite0.pth",
            "bert": bert}
