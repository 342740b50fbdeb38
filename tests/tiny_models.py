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
