"""Real pretrained towers loaded the way users load them (a timm image tower's weights from a file, a Hugging
Face text tower, the preprocessing the tower needs), LiT folders open_clip loads, and the cache of locked
towers' features (tiny models with random weights: the code paths of the real ones)."""

import json
import pickle

import pytest
import torch

from conftest import shape_images
from tiny_models import efficientnet_pytorch_state, lit_dual_encoder

PREPROCESS = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_interpolation="bicubic")


@pytest.fixture(scope="module")
def lit_parts(tmp_path_factory):
    return lit_dual_encoder(tmp_path_factory.mktemp("lit"))


def same_steps(first, second) -> bool:
    """Two transforms with the same steps and values (tuples and lists alike)."""
    return repr(first).replace("(", "[").replace(")", "]") == repr(second).replace("(", "[").replace(")", "]")


def lit_backbone(parts, **kwargs):
    from halo_embed.clip import load_backbone

    return load_backbone("open_clip", str(parts["config"]), **{"pretrained_image": str(parts["image_weights"]),
                                                               **PREPROCESS, **kwargs})


def test_efficientnet_pytorch_weights_load_into_the_timm_trunk(lit_parts):
    """The file's weights (EfficientNet-PyTorch layout) are the trunk's, every one; the tower's ImageNet head is
    the classifier they came with, so the trunk + that classifier reproduce the source network's logits."""
    import timm

    backbone = lit_backbone(lit_parts)
    torch.manual_seed(1)  # the source network lit_dual_encoder wrote
    source = timm.create_model("tf_efficientnet_lite0").eval()
    trunk = backbone.model.visual.trunk.eval()
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = trunk(x)
        assert torch.allclose(source.classifier(pooled), source(x), atol=1e-5)


def test_the_towers_preprocessing_reaches_the_transform_and_the_checkpoint(lit_parts, tmp_path):
    from torchvision.transforms import Normalize, Resize

    from halo_embed.clip import HALOCLIP, load_checkpoint, save_checkpoint

    backbone = lit_backbone(lit_parts)
    for train in (False, True):
        steps = backbone.image_transform(train=train).transforms
        normalize = next(t for t in steps if isinstance(t, Normalize))
        assert list(normalize.mean) == [0.5] * 3 and list(normalize.std) == [0.5] * 3
    resize = next(t for t in backbone.image_transform(False).transforms if isinstance(t, Resize))
    assert resize.interpolation.value == "bicubic"
    model = HALOCLIP(backbone, num_candidates=8)
    model.fit_adapter([(torch.randn(4, 3, 32, 32), backbone.tokenize(["a red circle", "a dog", "a cat", "a car"]))])
    save_checkpoint(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert saved["mean"] == [0.5] * 3 and saved["interpolation"] == "bicubic"
    rebuilt = load_checkpoint(tmp_path / "ckpt").backbone.image_transform(False)
    assert same_steps(rebuilt, backbone.image_transform(False))


def test_bad_image_weights_are_refused_by_name(lit_parts, tmp_path):
    state = torch.load(lit_parts["image_weights"], weights_only=True)
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth does not fit .*missing blocks\.2\.0\.bn2\.running_var"):
        lit_backbone(lit_parts, pretrained_image=str(tmp_path / "partial.pth"))

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "code.pth").write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ValueError, match="code.pth is not a readable weights file"):
        lit_backbone(lit_parts, pretrained_image=str(tmp_path / "code.pth"))
    with pytest.raises(ValueError, match="timm image tower"):
        from halo_embed.clip.tower_weights import load_image_tower_weights

        load_image_tower_weights(torch.nn.Linear(2, 2), lit_parts["image_weights"])


def test_timm_layout_and_prefixed_keys_load_too(lit_parts, tmp_path):
    import timm

    from halo_embed.clip.tower_weights import convert_efficientnet_pytorch, read_state_dict

    torch.manual_seed(1)
    source = timm.create_model("tf_efficientnet_lite0")
    # the converter and the test's own renaming are inverses of each other
    converted = convert_efficientnet_pytorch(efficientnet_pytorch_state(source), source)
    assert converted.keys() == source.state_dict().keys()
    torch.save({"model": {f"visual.trunk.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "timm.pt")
    backbone = lit_backbone(lit_parts, pretrained_image=str(tmp_path / "timm.pt"))
    assert torch.equal(backbone.model.visual.trunk.conv_stem.weight, source.conv_stem.weight)
    assert read_state_dict(tmp_path / "timm.pt").keys() == {f"visual.trunk.{k}" for k in source.state_dict()}


def test_a_lit_folder_is_an_open_clip_local_dir(lit_parts, tmp_path):
    """export_open_clip writes what open_clip itself loads with local-dir: (config, preprocessing, weights,
    tokenizer); a moved folder still loads through halo-embed (its text config is in the folder)."""
    import shutil

    import open_clip

    from halo_embed.clip import load_backbone
    from halo_embed.clip.backbones import export_open_clip

    backbone = lit_backbone(lit_parts).eval()
    folder = export_open_clip(backbone, tmp_path / "lit")
    with pytest.raises(FileExistsError):
        export_open_clip(backbone, tmp_path / "lit")
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    pixels = torch.stack([transform(image) for image in shape_images(3)])
    assert same_steps(transform, backbone.image_transform(False))
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), backbone.encode_image(pixels), atol=1e-6)
        texts = ["a red circle", "a small dog in the corner"]
        assert torch.equal(tokenizer(texts), backbone.tokenize(texts))
        assert torch.allclose(model.encode_text(tokenizer(texts)), backbone.encode_text(backbone.tokenize(texts)),
                              atol=1e-6)
    moved = shutil.move(str(folder), str(tmp_path / "moved"))
    again = load_backbone("open_clip", f"local-dir:{moved}").eval()
    with torch.no_grad():
        assert torch.allclose(again.encode_image(pixels), backbone.encode_image(pixels), atol=1e-6)


def test_locked_parts_run_in_eval_mode_and_split_the_tower_exactly(lit_parts, tiny_model_dirs):
    from halo_embed.clip import load_backbone

    backbone = lit_backbone(lit_parts)
    assert backbone.locked_split("image") is None and backbone.locked_split("text") is None
    backbone.lock_image()
    backbone.lock_text(0, freeze_layer_norm=False)  # trainable LayerNorms: the transformer is not locked
    assert backbone.locked_split("text") is None
    backbone.lock_text(0, freeze_layer_norm=True)
    backbone.train()
    image, text = backbone.locked_split("image"), backbone.locked_split("text")
    assert not image.module.training and not text.module.training  # BatchNorm / dropout of locked parts off
    assert backbone.model.visual.head.training and not image.whole and not text.whole
    pixels, tokens = torch.randn(3, 3, 32, 32), backbone.tokenize(["a red circle", "a dog", "a large blue square"])
    with torch.no_grad():
        assert torch.allclose(image.head(image.prefix(pixels)), backbone.model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(text.head(text.prefix(tokens)), backbone.model.encode_text(tokens), atol=1e-6)
    for family, name in (("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"),
                         ("transformers", str(tiny_model_dirs["hf"]))):
        other = load_backbone(family, name)
        other.lock_image()
        other.lock_text()
        assert other.locked_split("image").whole and other.locked_split("text").whole, family


def test_feature_cache_computes_each_input_once_and_persists(lit_parts, tmp_path):
    from halo_embed.clip.feature_cache import FeatureCache

    backbone = lit_backbone(lit_parts)
    backbone.lock_image()
    backbone.lock_text(0, freeze_layer_norm=True)
    backbone.eval()
    pixels = torch.randn(5, 3, 32, 32)
    tokens = backbone.tokenize(["a red circle", "a dog", "a cat", "a red circle", "a car"])
    with torch.no_grad():
        expected_images, expected_texts = backbone.encode_image(pixels), backbone.encode_text(tokens)
        cache = FeatureCache(tmp_path / "cache")
        backbone.attach_feature_cache(cache)
        assert torch.allclose(backbone.encode_image(pixels), expected_images, atol=1e-6)
        assert torch.allclose(backbone.encode_text(tokens), expected_texts, atol=1e-6)
        assert cache.misses == 5 + 4 and cache.hits == 1  # the repeated caption is computed once
        assert torch.allclose(backbone.encode_image(pixels[[4, 0]]), expected_images[[4, 0]], atol=1e-6)
        assert cache.hits == 3
        cache.flush()
        fresh = FeatureCache(tmp_path / "cache")
        backbone.attach_feature_cache(fresh)
        assert torch.allclose(backbone.encode_image(pixels), expected_images, atol=1e-6) and fresh.misses == 0
        # another image tower (changed weights) never reads these features
        backbone.model.visual.trunk.conv_stem.weight.add_(1.0)
        backbone.attach_feature_cache(fresh)
        backbone.encode_image(pixels)
        assert fresh.misses == 5


def test_cached_and_uncached_heads_only_training_give_the_same_model(lit_parts, tmp_path):
    """halo-embed finetune with both towers locked: features from the cache or from the towers every step, the
    same trained weights (and the second run reads the first one's shared cache without computing)."""
    from safetensors.torch import load_file

    from halo_embed.recipes.clip_finetune import FinetuneConfig, train

    common = dict(model=str(lit_parts["config"]), pretrained_image=str(lit_parts["image_weights"]),
                  image_mean=[0.5], image_std=[0.5], image_interpolation="bicubic", train_data="shapes",
                  shapes_train_images=32, shapes_val_images=16, eval_images=16, batch_size=8, max_steps=6,
                  warmup=1, adapter_samples=16, lr=1e-3, logs=str(tmp_path), progress=False, lock_image=True,
                  lock_text=True, lock_text_freeze_layer_norm=True, train_augment="none", report_to="none")
    train(FinetuneConfig(name="uncached", feature_cache="off", **common))
    train(FinetuneConfig(name="cached", feature_cache=str(tmp_path / "shared"), **common))
    assert any((tmp_path / "shared").rglob("*.safetensors"))
    uncached = load_file(str(tmp_path / "uncached" / "final" / "model.safetensors"))
    cached = load_file(str(tmp_path / "cached" / "final" / "model.safetensors"))
    assert [k for k in cached if "head.proj" in k] and [k for k in cached if "text.proj" in k]
    for key in cached:
        assert torch.allclose(cached[key], uncached[key], atol=1e-5), key


def test_sphere_geometry_starts_where_the_pretrained_model_is(tiny_model_dirs, tmp_path):
    """With normalization="sphere" and the temperature from the model's logit scale, before any step: HALO's
    zero-shot predictions and retrieval ranks are the cosine rule's, and its softmax over captions is CLIP's."""
    from halo_embed.clip import HALOCLIP, ContrastiveCLIP, load_backbone
    from halo_embed.clip.evaluate import view_of
    from halo_embed.clip.zeroshot import ZeroShotData, evaluate_zeroshot
    from halo_embed.eval import retrieval_recall
    from halo_embed.recipes.finetune_config import FinetuneConfig
    from halo_embed.recipes.finetune_model import initial_temperature

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}").eval()
    with torch.no_grad():
        backbone.model.logit_scale.fill_(3.2)  # a pretrained scale (e^3.2 = 24.5)
    config = FinetuneConfig(model="x", normalization="sphere")
    assert initial_temperature(backbone, config) == pytest.approx(0.5 * torch.tensor(3.2).exp().item())
    assert initial_temperature(backbone, FinetuneConfig(model="x")) is None  # fixed: HALO's reference start
    halo = HALOCLIP(backbone, num_candidates=8, normalization="sphere",
                    init_gamma=initial_temperature(backbone, config)).eval()
    clip = ContrastiveCLIP(backbone, "clip").eval()
    images = shape_images(30, seed=3)
    data = ZeroShotData(images, torch.arange(30) % 3, ["red circle", "blue square", "green cross"])
    templates = ["a photo of a {}.", "a picture of the {}.", "a small {}."]
    results = [evaluate_zeroshot(view_of(m), data, templates) for m in (halo, clip)]
    assert results[0]["top1"] == results[1]["top1"] and results[0]["top5"] == results[1]["top5"]
    pixels = torch.stack([backbone.image_transform(False)(image) for image in images[:12]])
    captions = [f"a {c} {s} in the {p}" for c, s, p in zip(["red", "blue", "green"] * 4, ["circle", "square"] * 6,
                                                             ["top", "center", "corner", "left"] * 3)]
    tokens = backbone.tokenize(captions)
    with torch.no_grad():
        halo_images, halo_texts = halo.encode_image(pixels), halo.encode_text(tokens)
        clip_images = torch.nn.functional.normalize(backbone.encode_image(pixels), dim=-1)
        clip_texts = torch.nn.functional.normalize(backbone.encode_text(tokens), dim=-1)
    ids = torch.arange(12)
    assert retrieval_recall(halo_images, halo_texts, ids, metric="l2", backend="torch") == \
        retrieval_recall(clip_images, clip_texts, ids, metric="cosine", backend="torch")
    from halo_embed import geometry

    halo_softmax = geometry.shifted_logits(halo_images, halo_texts, halo.temperature.detach()).softmax(-1)
    clip_softmax = (backbone.model.logit_scale.exp() * clip_images @ clip_texts.T).softmax(-1)
    assert torch.allclose(halo_softmax, clip_softmax, atol=1e-5)


def test_the_temperature_has_its_own_learning_rate(tiny_model_dirs):
    from halo_embed.recipes.clip_finetune import FinetuneConfig, build_model, optimizer_groups

    config = FinetuneConfig(model=f"local-dir:{tiny_model_dirs['open_clip_local_dir']}", lr=1e-4)
    model = build_model(config)
    groups = optimizer_groups(model, config)
    gamma_groups = [g for g in groups if any(p is model.loss.gamma for p in g["params"])]
    assert len(gamma_groups) == 1 and gamma_groups[0]["lr"] == pytest.approx(1e-4 * float(model.temperature))
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    config.temperature_lr = 0.05
    assert [g for g in optimizer_groups(model, config) if g.get("lr")][0]["lr"] == 0.05


def test_auto_normalization_is_the_sphere_for_pretrained_models():
    from halo_embed.recipes.clip_finetune import FinetuneConfig

    resolved = lambda **kw: FinetuneConfig(**kw).adapter_normalization()  # noqa: E731
    assert resolved(model="halo-tiny-vit") == "fixed"  # random weights: the measured default of scratch training
    for kwargs in ({"model": "ViT-B-32", "pretrained": "openai"}, {"model": "local-dir:x"}, {"model": "hf-hub:a/b"},
                   {"model": "lit.json", "pretrained_image": "w.pth"}, {"family": "transformers", "model": "x"}):
        assert resolved(**kwargs) == "sphere", kwargs
    assert resolved(model="local-dir:x", normalization="running") == "running"


def test_freezing_batch_norm_statistics_keeps_timm_activations(lit_parts):
    """--lock-image-freeze-bn-stats on a timm tower: the locked BatchNorms keep their statistics and their
    activation (open_clip's own conversion turns timm's BatchNormAct2d into a plain BatchNorm, changing the
    network), the unlocked ones still train."""
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    backbone = lit_backbone(lit_parts).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = backbone.encode_image(pixels)
    backbone.lock_image(2, freeze_bn_stats=True)
    trunk = backbone.model.visual.trunk
    assert isinstance(trunk.bn1, FrozenBatchNormAct2d) and isinstance(trunk.bn2, BatchNormAct2d)
    with torch.no_grad():
        assert torch.allclose(backbone.encode_image(pixels), before, atol=1e-5)  # the same network
    backbone.train()
    locked, unlocked = trunk.blocks[0][0].bn1.running_mean.clone(), trunk.bn2.running_mean.clone()
    backbone.encode_image(pixels)  # a training-mode forward: only the unlocked BatchNorms learn statistics
    assert torch.equal(trunk.blocks[0][0].bn1.running_mean, locked)
    assert not torch.equal(trunk.bn2.running_mean, unlocked)


def test_a_checkpoint_never_sends_its_text_tower_to_the_hub(lit_parts, tmp_path):
    """A checkpoint whose Hugging Face text tower config is missing is damaged: it is refused (exit 2), not
    looked up on the hub under the name in its config."""
    import shutil

    from halo_embed.clip import HALOCLIP, load_checkpoint, save_checkpoint

    model = HALOCLIP(lit_backbone(lit_parts), 8, normalization="sphere")
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert load_checkpoint(folder).embed_dim == 24
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(ValueError, match="is damaged: its Hugging Face text tower .* has no saved config"):
        load_checkpoint(folder)
