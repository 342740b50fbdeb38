"""Every command against the broken inputs users give it.

For each case: no traceback on stderr, the exit code from the table (1 some rows rejected, 2 usage or input
error; 0 only for odd but valid input; never 3), nothing written outside the command's output folder, and
no existing file changed.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_images
from halo_embed.cli import main


def snapshot(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run(capsys, args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dirs):
    """A good checkpoint and images, and a zoo of broken files next to them."""
    from safetensors.torch import load_file, save_file

    from halo_embed.clip import HALOCLIP, load_backbone, save_checkpoint

    root = tmp_path_factory.mktemp("broken")
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    model = HALOCLIP(backbone, num_candidates=8)
    transform = backbone.image_transform()
    model.fit_adapter([(torch.stack([transform(im) for im in shape_images(8, s)]),
                      backbone.tokenize([f"shape {i}" for i in range(8)])) for s in range(2)])
    good = save_checkpoint(model, root / "good-ckpt")
    for name, damage in (("cut", "cut"), ("nan", "nan"), ("noconfig", "noconfig"), ("badjson", "badjson")):
        ckpt = save_checkpoint(model, root / f"{name}-ckpt")
        weights_path = ckpt / "model.safetensors"
        if damage == "cut":
            weights_path.write_bytes(weights_path.read_bytes()[:1000])
        elif damage == "nan":
            weights = load_file(str(weights_path))
            key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
            weights[key].view(-1)[0] = float("nan")
            save_file(weights, str(weights_path), metadata={"format": "halo-embed/haloclip"})
        elif damage == "noconfig":
            (ckpt / "config.json").unlink()
        else:
            (ckpt / "config.json").write_text("{ damaged")
    (root / "a-file-not-a-folder").write_text("x")
    images = root / "images"
    images.mkdir()
    shape_images(1)[0].save(images / "ok.png")
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("not an image at all")
    (images / "cut.png").write_bytes((images / "ok.png").read_bytes()[:50])
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(images / "grey16.png")
    Image.new("RGB", (400, 300)).save(images / "large.png")
    csvs = root / "csv"
    csvs.mkdir()
    (csvs / "empty.csv").write_text("")
    (csvs / "header-only.csv").write_text("image,caption\n")
    (csvs / "wrong-columns.csv").write_text("path,text\nok.png,a shape\n")
    (csvs / "bad-bytes.csv").write_bytes(b"image,caption\n../images/ok.png,a \xff\xfe shape\n")
    (csvs / "bad-rows.csv").write_text("image,caption\n../images/ok.png,a shape\n../images/cut.png,a shape\n"
                                       "../images/text.png,a shape\n../images/missing.png,a shape\n"
                                       "../images/ok.png,\n,a shape\n../images/large.png,a shape\n")
    (csvs / "unterminated.csv").write_text('image,caption\n../images/ok.png,"a shape\n')
    (csvs / "binary.csv").write_bytes(bytes(range(256)) * 10)
    (csvs / "all-missing.csv").write_text("filepath,title\n" + "".join(f"gone/{i}.png,shape {i}\n" for i in range(40)))
    (csvs / "duplicate-column.csv").write_text("image,caption,caption\n../images/ok.png,a,b\n")
    (csvs / "formula.csv").write_text("image,caption\n../images/ok.png,=HYPERLINK(\"x\")\n")
    (images / "a-folder.png").mkdir()
    (images / "loop.png").symlink_to(images / "loop.png")
    os.mkfifo(images / "pipe.png")
    damaged = save_checkpoint(model, root / "negative-width-ckpt")
    config = (damaged / "open_clip_config.json").read_text().replace('"width": 32', '"width": -32', 1)
    (damaged / "open_clip_config.json").write_text(config)
    return {"root": root, "good": good, "images": images, "csvs": csvs}


SCORE_CASES = {
    # name: (arguments after --checkpoint, allowed exit codes)
    "missing checkpoint": (["{root}/nope-ckpt", "--image", "{images}/ok.png", "--text", "a"], {2}),
    "checkpoint is a file": (["{root}/a-file-not-a-folder", "--image", "{images}/ok.png", "--text", "a"], {2}),
    "truncated weights": (["{root}/cut-ckpt", "--image", "{images}/ok.png", "--text", "a"], {2}),
    "NaN weights": (["{root}/nan-ckpt", "--image", "{images}/ok.png", "--text", "a", "--json"], {2}),
    "no config.json": (["{root}/noconfig-ckpt", "--image", "{images}/ok.png", "--text", "a"], {2}),
    "damaged config.json": (["{root}/badjson-ckpt", "--image", "{images}/ok.png", "--text", "a"], {2}),
    "empty image": (["{good}", "--image", "{images}/empty.png", "--text", "a"], {2}),
    "text file as image": (["{good}", "--image", "{images}/text.png", "--text", "a"], {2}),
    "truncated image": (["{good}", "--image", "{images}/cut.png", "--text", "a"], {2}),
    "missing image": (["{good}", "--image", "{images}/nope.png", "--text", "a"], {2}),
    "image over the pixel limit": (["{good}", "--image", "{images}/large.png", "--text", "a",
                                    "--max-image-pixels", "1000"], {2}),
    "empty caption": (["{good}", "--image", "{images}/ok.png", "--text", "  "], {2}),
    "bad device": (["{good}", "--image", "{images}/ok.png", "--text", "a", "--device", "banana"], {2}),
    "empty CSV": (["{good}", "--pairs", "{csvs}/empty.csv"], {2}),
    "header-only CSV": (["{good}", "--pairs", "{csvs}/header-only.csv"], {2}),
    "wrong columns": (["{good}", "--pairs", "{csvs}/wrong-columns.csv"], {2}),
    "bad bytes": (["{good}", "--pairs", "{csvs}/bad-bytes.csv"], {1}),
    "bad rows": (["{good}", "--pairs", "{csvs}/bad-rows.csv", "--max-image-pixels", "50000"], {1}),
    "unterminated quote": (["{good}", "--pairs", "{csvs}/unterminated.csv"], {2}),
    "binary file as CSV": (["{good}", "--pairs", "{csvs}/binary.csv"], {2}),
    "16-bit greyscale image (valid)": (["{good}", "--image", "{images}/grey16.png", "--text", "a"], {0}),
    "CSV is a folder": (["{good}", "--pairs", "{csvs}"], {2}),
    "both forms": (["{good}", "--pairs", "{csvs}/bad-rows.csv", "--image", "{images}/ok.png"], {2}),
    "output folder missing": (["{good}", "--pairs", "{csvs}/bad-rows.csv", "--output", "{root}/no/out.csv"], {2}),
    "output is a folder": (["{good}", "--pairs", "{csvs}/bad-rows.csv", "--output", "{csvs}"], {2}),
    "a column twice in the header": (["{good}", "--pairs", "{csvs}/duplicate-column.csv"], {2}),
    "one column for image and text": (["{good}", "--pairs", "{csvs}/bad-rows.csv", "--image-column", "image",
                                       "--text-column", "image"], {2}),
    "a folder as image": (["{good}", "--image", "{images}/a-folder.png", "--text", "a"], {2}),
    "a symlink loop as image": (["{good}", "--image", "{images}/loop.png", "--text", "a"], {2}),
    "a named pipe as image": (["{good}", "--image", "{images}/pipe.png", "--text", "a"], {2}),
    "config describing a negative width": (["{root}/negative-width-ckpt", "--image", "{images}/ok.png", "--text",
                                            "a"], {2}),
}


@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_score_with_broken_inputs(inputs, capsys, case):
    args, codes = SCORE_CASES[case]
    paths = {k: v for k, v in inputs.items()}
    before = snapshot(inputs["root"])
    code, err = run(capsys, ["score", "--checkpoint", *(a.format(**paths) for a in args)])
    assert code in codes, (case, code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err  # one readable line
    assert snapshot(inputs["root"]) == before  # nothing written, nothing changed


def test_score_bad_rows_are_reported_and_the_rest_scored(inputs, capsys, tmp_path):
    out = tmp_path / "scores.json"
    code, err = run(capsys, ["score", "--checkpoint", inputs["good"], "--pairs", inputs["csvs"] / "bad-rows.csv",
                             "--output", out, "--max-image-pixels", "50000"])
    assert code == 1 and "scored 1 of 7 pairs" in err
    for line in (3, 4, 5, 6, 7, 8):
        assert f"bad-rows.csv, line {line} " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


FINETUNE_CASES = {
    "missing train CSV": (["--train-data", "{root}/nope.csv", "--val-data", "{root}/nope.csv"], {2}),
    "empty train CSV": (["--train-data", "{csvs}/empty.csv", "--val-data", "{csvs}/empty.csv"], {2}),
    "every image missing": (["--train-data", "{csvs}/all-missing.csv", "--val-data", "{csvs}/all-missing.csv",
                             "--batch-size", "8", "--loss", "clip"], {2}),
    "every image missing, halo": (["--train-data", "{csvs}/all-missing.csv", "--val-data",
                                   "{csvs}/all-missing.csv", "--batch-size", "8"], {2}),
    "unknown model": (["--model", "ViT-Z-99"], {2}),
    "missing model config": (["--model", "{root}/nope.json"], {2}),
    "zero steps": (["--max-steps", "0"], {2}),
    "negative steps": (["--max-steps", "-1"], {2}),
    "bad momentum": (["--normalization", "running", "--normalization-momentum", "2"], {2}),
    "infinite lr": (["--lr", "inf"], {2}),
    "NaN weight decay": (["--wd", "nan"], {2}),
    "negative warm-up": (["--warmup", "-5"], {2}),
    "beta2 of 1": (["--beta2", "1"], {2}),
    # (the arguments go through str.format: doubled braces are the template's own)
    "template with a named field": (["--zeroshot-data", "{images}", "--zeroshot-templates", "{{name}} is {{}}"],
                                    {2}),
    "template with a stray brace": (["--zeroshot-data", "{images}", "--zeroshot-templates", "a {{}} photo {{"],
                                    {2}),
}


@pytest.mark.parametrize("case", list(FINETUNE_CASES))
def test_finetune_with_broken_inputs(inputs, tiny_model_dirs, capsys, tmp_path, case):
    args, codes = FINETUNE_CASES[case]
    paths = {k: v for k, v in inputs.items()}
    model = ["--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}"] if "--model" not in args else []
    before = snapshot(inputs["root"])
    code, err = run(capsys, ["finetune", *model, *(a.format(**paths) for a in args), "--logs", tmp_path / "runs",
                             "--name", "r", "--no-progress", "--adapter-samples", "16"])
    assert code in codes, (case, code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert snapshot(inputs["root"]) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


CIFAR_CASES = {
    "missing data": (["--data-dir", "{root}/nowhere"], {2}),
    "imagefolder without OOD sets": (["--dataset", "imagefolder", "--data-dir", "{images}"], {2}),
    "imagefolder that is not one": (["--dataset", "imagefolder", "--data-dir", "{images}", "--near-ood",
                                     "{images}", "--far-ood", "{images}"], {2}),
    "bad preset": (["--preset", "huge"], {2}),
    "zero epochs": (["--epochs", "0", "--data-dir", "{root}/nowhere"], {2}),
    "missing OOD file": (["--data-dir", "{root}/nowhere", "--far-ood", "{root}/nope.npz"], {2}),
    "bad device": (["--device", "banana"], {2}),
    "no GPU": (["--device", "cuda:9"], {2}),
}


@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_cifar_with_broken_inputs(inputs, capsys, tmp_path, case):
    args, codes = CIFAR_CASES[case]
    paths = {k: v for k, v in inputs.items()}
    before = snapshot(inputs["root"])
    try:
        code, err = run(capsys, ["cifar", *(a.format(**paths) for a in args), "--output", tmp_path / "runs",
                                 "--no-progress"])
    except SystemExit as exit_:  # argparse's own usage errors exit 2 with a usage line
        code, err = exit_.code, capsys.readouterr().err
    assert code in codes, (case, code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert snapshot(inputs["root"]) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("latest.pt"))


def test_score_csv_output_never_holds_a_formula(inputs, capsys, tmp_path):
    """A caption a spreadsheet would run (=, +, -, @) is written with a leading quote in CSV output."""
    import csv

    out = tmp_path / "scores.csv"
    code, err = run(capsys, ["score", "--checkpoint", inputs["good"], "--pairs", inputs["csvs"] / "formula.csv",
                             "--output", out, "--workers", "0"])
    assert code == 0, err
    (row,) = list(csv.DictReader(out.open()))
    assert row["text"] == "'=HYPERLINK(\"x\")" and float(row["logit"]) == float(row["logit"])


def test_wise_ft_names_a_bad_device(capsys, tmp_path):
    code, err = run(capsys, ["wise-ft", tmp_path, "--device", "gpu"])
    assert code == 2 and "--device must be a device such as cpu, cuda or cuda:1, got 'gpu'" in err


NOTHING_WRITTEN_CASES = {  # input errors of the zero-shot, WiSE-FT and resume paths: exit 2 before any write
    "zero-shot class without a name": ["--zeroshot-data", "{zeroshot}", "--zeroshot-classnames", "{names}"],
    "zero-shot data missing": ["--zeroshot-data", "{root}/nowhere"],
    "resume of a run that never saved": ["--resume", "latest"],
    "resume of a folder that is no checkpoint": ["--resume", "{root}"],
    "WiSE-FT alpha outside [0, 1]": ["--wise-ft", "1.5"],
    "calibration split leaving too few images": ["--calibration-split", "0.5"],
}


@pytest.mark.parametrize("case", list(NOTHING_WRITTEN_CASES))
def test_finetune_input_errors_write_nothing(inputs, tiny_model_dirs, capsys, tmp_path, case):
    zeroshot = tmp_path / "zeroshot"
    for name in ("c01", "c02"):
        (zeroshot / name).mkdir(parents=True)
        shape_images(1)[0].save(zeroshot / name / "0.png")
    (tmp_path / "names.tsv").write_text("c01\ta circle\n")  # no name for c02
    paths = {**inputs, "zeroshot": zeroshot, "names": tmp_path / "names.tsv"}
    args = [a.format(**paths) for a in NOTHING_WRITTEN_CASES[case]]
    before = snapshot(tmp_path)
    code, err = run(capsys, ["finetune", "--model", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}",
                             "--shapes-train-images", "60", "--logs", tmp_path / "runs", "--name", "r",
                             "--no-progress", *args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert snapshot(tmp_path) == before and not (tmp_path / "runs").exists(), case


def test_wise_ft_input_errors_write_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"loss": "halo", "model": "halo-tiny-vit"}')
    before = snapshot(tmp_path)
    for args in (["--alphas", "2"], ["--alphas", "0.5"]):  # a bad alpha; no initial/
        code, err = run(capsys, ["wise-ft", run_dir, *args])
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
