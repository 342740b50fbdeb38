import os
import sys

import pytest

# Tests never download: every model and dataset is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, os.path.dirname(__file__))  # for the reference implementations


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Tiny open_clip and transformers CLIP models saved the way users have them on disk."""
    from tiny_models import hf_clip_dir, open_clip_local_dir, open_clip_registered

    root = tmp_path_factory.mktemp("tiny_models")
    name, weights = open_clip_registered(root / "registered")
    return {
        "open_clip_local_dir": open_clip_local_dir(root / "open_clip"),
        "open_clip_name": name,
        "open_clip_weights": weights,
        "hf": hf_clip_dir(root / "hf"),
    }


@pytest.fixture(params=["open_clip", "transformers"])
def tiny_backbone(request, tiny_model_dirs):
    """One backbone of each family, loaded through the users' paths."""
    from halo_embed.clip import load_backbone

    if request.param == "open_clip":
        return load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    return load_backbone("transformers", str(tiny_model_dirs["hf"]))


def shape_images(n, seed=0, size=40):
    """Generated RGB images: a coloured disc or square on a grey background."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(4, size // 2, 2))
        box = (x, y, x + size // 3, y + size // 3)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=colour)
        images.append(image)
    return images
