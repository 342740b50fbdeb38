"""Webdataset shards and parquet files: reading them (damage counted, never raised), scoring them through the
streaming path and on Ray with the same answer per key, resuming a killed scorer, `filter`'s shards, and
`finetune` on shards in 1 and 2 processes (the epoch's share, resume)."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import shape_images
from halo_embed.clip import load_backbone, save_checkpoint
from halo_embed.data.shards import Unit, UnitReport, expand_shards, input_kind, list_units, read_unit
from test_clip import calibrated, run_cli  # noqa: F401  (run_cli is a fixture)

COLOURS = ["red", "blue", "green", "yellow", "purple"]


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_pool(folder, shards, per_shard, size=32, damage=True):
    """Shards as img2dataset writes them (webdataset's own ShardWriter: jpg / png + txt + json per sample);
    with ``damage``: one sample without a caption, one with bytes that are no image, one without an image."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    images = shape_images(16, size=size)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            sample = {"__key__": f"{i:07d}", "txt": f"a {COLOURS[i % 5]} shape number {i}",
                      "json": {"uid": i}}
            sample["jpg" if i % 2 else "png"] = encoded(images[i % 16], "JPEG" if i % 2 else "PNG")
            if damage and i == 5:
                del sample["txt"]
            if damage and i == per_shard + 3:
                sample["jpg"] = b"these bytes are no image"
            if damage and i == 2 * per_shard + 1:
                del sample["jpg"]
            sink.write(sample)
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


@pytest.fixture(scope="module")
def pool(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    checkpoint = save_checkpoint(calibrated(backbone), root / "ckpt")
    return {"root": root, "checkpoint": str(checkpoint), "shards": write_pool(root / "shards", 4, 24)}


def score_args(pool, output, *extra, pairs=None):
    return ["score", "--checkpoint", pool["checkpoint"], "--pairs", pairs or pool["shards"], "--output", str(output),
            "--device", "cpu", "--batch-size", "5", "--threads", "1", *extra]


def read_parquet(path):
    import pyarrow.parquet as pq

    return {row["key"]: row for row in pq.read_table(path).to_pylist()}


# --- reading -----------------------------------------------------------------------------------------------------

def test_shard_specs_expand_like_open_clip_train(tmp_path):
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        (tmp_path / name).write_bytes(b"")
    braces = expand_shards(f"{tmp_path}/{{00000..00002}}.tar")
    assert [os.path.basename(u) for u in braces] == ["00000.tar", "00001.tar", "00002.tar"]
    assert expand_shards(f"{tmp_path}/00002.tar::{tmp_path}/00000.tar") == [f"{tmp_path}/00002.tar",
                                                                             f"{tmp_path}/00000.tar"]
    assert expand_shards(f"{tmp_path}/*.tar") == braces
    assert expand_shards("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    with pytest.raises(ValueError, match="matches no file"):
        expand_shards(f"{tmp_path}/{{00007..00009}}.tar")
    with pytest.raises(ValueError, match="1 of its 4 shards do not exist, e.g. .*00003.tar"):
        expand_shards(f"{tmp_path}/{{00000..00003}}.tar")
    assert [input_kind(s) for s in ("a/{0..3}.tar", "x.tar", "a.tar::b.tar", "p.parquet", "p/{0..3}.parquet",
                                    "pairs.csv")] == ["webdataset", "webdataset", "webdataset", "parquet", "parquet",
                                                      "csv"]


def test_damage_is_counted_per_shard_not_raised(pool, tmp_path):
    """A sample without caption / image or with undecodable bytes, a truncated tar: counted, the rest read."""
    first = Unit(expand_shards(pool["shards"])[0])
    report = UnitReport()
    samples = list(read_unit(first, report))
    assert report.samples == 24 and not report.errors
    assert [s.error for s in samples if s.error] == ["no caption (txt) in the sample"]
    third = Unit(expand_shards(pool["shards"])[2])
    assert [s.error for s in read_unit(third, UnitReport()) if s.error] == ["no image (jpg/png/webp) in the sample"]

    data = open(first.path, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    report = UnitReport()
    read = [s.key for s in read_unit(Unit(str(cut)), report)]
    assert 5 <= len(read) < 24 and read == [f"{i:07d}" for i in range(len(read))]
    assert len(report.errors) == 1 and str(cut) in report.errors[0]
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a tar at all" * 100)
    report = UnitReport()
    assert list(read_unit(Unit(str(garbage)), report)) == [] and report.errors


# --- scoring: one answer per key, whatever the engine ---------------------------------------------------------

def test_shards_score_the_same_per_key_in_any_process_layout(pool, tmp_path, run_cli):  # noqa: F811
    """0 and 2 DataLoader workers, batches cut per shard: identical records; bad samples have their errors."""
    results = {}
    for workers in ("0", "2"):
        done = run_cli(*score_args(pool, tmp_path / f"w{workers}.parquet", "--workers", workers))
        assert done.returncode == 1, done.stderr  # the damaged samples
        assert "scored 93 of 96 pairs in 4 unit(s)" in done.stderr and "3 sample(s) skipped" in done.stderr
        assert f"{expand_shards(pool['shards'])[1]}: 1 of 24 sample(s) skipped" in done.stderr
        results[workers] = read_parquet(tmp_path / f"w{workers}.parquet")
    assert results["0"] == results["2"] and len(results["0"]) == 96
    record = results["0"]["0000010"]
    assert record["error"] is None and 0 <= record["probability"] <= 1 and -1 <= record["cosine"] <= 1
    assert record["accept"] == (record["probability"] >= 0.5)
    assert results["0"]["0000027"]["error"].startswith("cannot read image")
    assert results["0"]["0000049"]["error"] == "no image (jpg/png/webp) in the sample"
    assert not (tmp_path / "w0.parquet.parts").exists()

    # the same pairs from a CSV of image files score the same (the shard path adds no numerics of its own)
    from halo_embed.clip import AlignmentScorer

    scorer = AlignmentScorer.from_checkpoint(pool["checkpoint"], device="cpu", batch_size=5)
    good = [s for s in read_unit(Unit(expand_shards(pool["shards"])[3]), UnitReport())][:5]
    from halo_embed.data.images import load_image

    direct = scorer.score([load_image(s.image) for s in good], [s.text for s in good]).to_records()
    for sample, expected in zip(good, direct):
        torch.testing.assert_close(results["0"][sample.key]["probability"], expected["probability"], rtol=1e-5,
                                   atol=1e-7)


def test_parquet_input_with_bytes_or_paths_and_csv_json_outputs(pool, tmp_path, run_cli):  # noqa: F811
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [s for s in read_unit(Unit(expand_shards(pool["shards"])[3]), UnitReport())]
    (tmp_path / "img").mkdir()
    paths = []
    for i, sample in enumerate(samples[:10]):
        (tmp_path / "img" / f"{i}.bin").write_bytes(sample.image)
        paths.append(f"img/{i}.bin")
    table = pa.table({"uid": [s.key for s in samples[:10]], "image": paths, "caption": [s.text for s in samples[:10]]})
    pq.write_table(table, tmp_path / "by_path.parquet", row_group_size=4)  # 3 units
    table = pa.table({"uid": [s.key for s in samples[10:]], "jpg": [{"bytes": s.image, "path": None}
                                                                       for s in samples[10:]],
                      "txt": [s.text for s in samples[10:]]})
    pq.write_table(table, tmp_path / "by_bytes.parquet")
    assert len(list_units(str(tmp_path / "by_path.parquet"), "parquet")) == 3

    shards = read_parquet_from(run_cli, pool, tmp_path, "shards.parquet", pool["shards"])
    for name in ("by_path", "by_bytes"):
        scored = read_parquet_from(run_cli, pool, tmp_path, f"{name}.out.parquet", str(tmp_path / f"{name}.parquet"))
        for key, record in scored.items():  # the same pair, the same numbers (batches of 5 from the unit's start)
            assert record["probability"] == pytest.approx(shards[key]["probability"], rel=1e-5, abs=1e-8), key
    for suffix in ("csv", "json"):
        done = run_cli(*score_args(pool, tmp_path / f"s.{suffix}", pairs=str(tmp_path / "by_bytes.parquet")))
        assert done.returncode == 0, done.stderr
    import csv

    bad = run_cli("score", "--checkpoint", str(tmp_path / "no-ckpt"), "--pairs", str(tmp_path / "by_bytes.parquet"),
                  "--text-column", "title", "--output", str(tmp_path / "x.parquet"))
    assert bad.returncode == 2 and "has no column 'title' (--text-column" in bad.stderr
    lines = run_cli("score", "--checkpoint", pool["checkpoint"], "--pairs", str(tmp_path / "by_path.parquet"),
                    "--device", "cpu", "--batch-size", "5", "--threads", "1", "--workers", "0")
    assert lines.returncode == 0, lines.stderr
    printed = {r["key"]: r for r in map(json.loads, lines.stdout.splitlines())}
    assert printed == read_parquet(tmp_path / "by_path.out.parquet")  # JSON lines: the same records
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["key"] for r in rows] == [r["key"] for r in data["pairs"]] == [s.key for s in samples[10:]]
    assert set(rows[0]) == {"key", "shard", "text", "probability", "accept", "logit", "cosine", "truncated", "error"}


def read_parquet_from(run_cli, pool, tmp_path, name, pairs):  # noqa: F811
    done = run_cli(*score_args(pool, tmp_path / name, pairs=pairs))
    assert done.returncode in (0, 1), done.stderr
    return read_parquet(tmp_path / name)


def test_a_killed_shard_run_resumes_to_the_same_output(pool, tmp_path, run_cli):  # noqa: F811
    spec = write_pool(tmp_path / "many", 8, 24, size=48, damage=False)
    full = tmp_path / "full.parquet"
    assert run_cli(*score_args(pool, full, "--workers", "0", pairs=spec)).returncode == 0
    output = tmp_path / "part.parquet"
    parts = tmp_path / "part.parquet.parts"
    command = [sys.executable, "-m", "halo_embed.cli", *score_args(pool, output, "--workers", "0", pairs=spec)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and len(list(parts.glob("*.parquet"))) < 2:
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be killed: make the test's input longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = len(list(parts.glob("*.parquet")))
    assert 2 <= kept < 8 and not output.exists()

    again = run_cli(*score_args(pool, output, "--workers", "0", pairs=spec))
    assert again.returncode == 2 and "add --resume" in again.stderr
    other = run_cli(*score_args(pool, output, "--workers", "0", "--batch-size", "7", "--resume", pairs=spec))
    assert other.returncode == 2 and "settings differ" in other.stderr
    resumed = run_cli(*score_args(pool, output, "--workers", "0", "--resume", pairs=spec))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} of 8 units were scored before" in resumed.stderr
    assert read_parquet(output) == read_parquet(full) and not parts.exists()
    assert list(read_parquet(output)) == list(read_parquet(full))  # in the input's order


def test_input_mistakes_stop_before_the_model_loads(pool, tmp_path, run_cli):  # noqa: F811
    """No such checkpoint is ever opened: each mistake is found first, one line, exit 2."""
    missing = ["score", "--checkpoint", str(tmp_path / "no-ckpt"), "--device", "cpu"]
    done = run_cli(*missing, "--pairs", f"{tmp_path}/{{00000..00003}}.tar", "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "matches no file" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli(*missing, "--pairs", pool["shards"], "--output", str(tmp_path / "o.parquet"), "--engine", "ray",
                   "--ray-address", "127.0.0.1:1")
    assert done.returncode == 2 and "nothing answers at 127.0.0.1:1" in done.stderr
    done = run_cli(*missing, "--pairs", pool["shards"], "--output", str(tmp_path / "o.txt"))
    assert done.returncode == 2 and "--output must end in .csv, .json or .parquet" in done.stderr
    done = run_cli(*missing, "--pairs", pool["shards"], "--engine", "ray")
    assert done.returncode == 2 and "--engine ray needs --output" in done.stderr
    hidden = ("import sys; sys.modules['ray'] = None; from halo_embed.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", hidden, *missing, "--pairs", pool["shards"], "--output",
                           str(tmp_path / "o.parquet"), "--engine", "ray"], capture_output=True, text=True)
    assert done.returncode == 2 and "pip install 'halo-embed[ray]'" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- Ray: the same answer as the streaming path -----------------------------------------------------------------

@pytest.mark.ray
def test_ray_scores_and_filters_like_the_streaming_path(pool, tmp_path, run_cli):  # noqa: F811
    pytest.importorskip("ray")
    stream = run_cli(*score_args(pool, tmp_path / "stream.parquet", "--workers", "2"))
    on_ray = run_cli(*score_args(pool, tmp_path / "ray.parquet", "--engine", "ray", "--ray-workers", "2",
                                 "--ray-cpus-per-worker", "1"))
    assert on_ray.returncode == stream.returncode == 1, on_ray.stderr
    assert read_parquet(tmp_path / "ray.parquet") == read_parquet(tmp_path / "stream.parquet")  # bit for bit

    kept = {}
    for engine in ("stream", "ray"):
        args = ["filter", "--checkpoint", pool["checkpoint"], "--input", pool["shards"], "--output-dir",
                str(tmp_path / engine), "--device", "cpu", "--batch-size", "5", "--threads", "1",
                "--top-fraction", "0.5", "--engine", engine] + (["--ray-workers", "2"] if engine == "ray" else [])
        done = run_cli(*args)
        assert done.returncode == 1, done.stderr
        kept[engine] = sorted((tmp_path / engine / "shards").glob("*.tar"))
    assert [p.name for p in kept["stream"]] == [p.name for p in kept["ray"]]
    for a, b in zip(kept["stream"], kept["ray"]):
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.ray
def test_an_interrupted_ray_run_resumes_at_shard_granularity(pool, tmp_path, run_cli):  # noqa: F811
    """A Ray run killed (SIGTERM, what a scheduler sends: Ray's driver exits through its clean-up): the
    finished shards stay, the resume (on Ray) scores the rest, the same output."""
    pytest.importorskip("ray")
    spec = write_pool(tmp_path / "many", 8, 200, size=64, damage=False)
    full = tmp_path / "full.parquet"
    assert run_cli(*score_args(pool, full, "--workers", "0", pairs=spec)).returncode == 0
    output, parts = tmp_path / "ray.parquet", tmp_path / "ray.parquet.parts"
    ray_args = score_args(pool, output, "--engine", "ray", "--ray-workers", "1", pairs=spec)
    process = subprocess.Popen([sys.executable, "-m", "halo_embed.cli", *ray_args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and not list(parts.glob("*.parquet")):
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be killed: make the input longer"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0, process.stderr.read()[-2000:]
    kept = len(list(parts.glob("*.parquet")))
    assert 1 <= kept < 8 and not output.exists()
    resumed = run_cli(*ray_args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} of 8 units were scored before" in resumed.stderr
    assert read_parquet(output) == read_parquet(full)


# --- filter -------------------------------------------------------------------------------------------------------

def test_the_top_fraction_is_exact_with_ties_and_bounded_memory(tmp_path):
    """top_threshold + Selection against a stable sort: ties broken by position, unscored rows never kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from halo_embed.commands.filter import Selection, top_threshold, unit_tables

    rng = np.random.default_rng(0)
    n = 5000
    probability = rng.choice([0.0, 1e-300, 0.25, 0.5, 0.75, 1.0], size=n).astype(np.float64)
    probability[::7] = rng.random(n)[::7]
    error = [None if i % 11 else "broken" for i in range(n)]
    table = pa.table({"key": [f"{i:05d}" for i in range(n)], "probability": probability,
                      "accept": probability >= 0.5, "logit": probability, "cosine": probability, "error": error})
    path = tmp_path / "scores.parquet"
    units_rows = [["u", None, 1000], ["v", None, 0], ["w", None, 2500], ["x", None, 1500]]
    pq.write_table(table.replace_schema_metadata({"units": json.dumps(units_rows)}), path, row_group_size=700)
    scores = pq.ParquetFile(path)
    scored = np.array([e is None for e in error])
    for fraction in (0.01, 0.3, 0.5, 0.999, 1.0):
        count = int(np.ceil(fraction * scored.sum()))
        order = np.argsort(-np.where(scored, probability, -np.inf), kind="stable")[:count]
        expected = np.zeros(n, dtype=bool)
        expected[order] = True
        selection = Selection(top_threshold(scores, count))
        parts = [(i, t) for i, t in unit_tables(scores, units_rows)]
        assert [t.num_rows for _, t in parts] == [1000, 0, 2500, 1500]
        got = np.concatenate([selection.mask(t) for _, t in parts])
        assert (got == expected).all(), fraction
    accepted = np.concatenate([Selection(None).mask(t) for _, t in unit_tables(scores, units_rows)])
    assert (accepted == (scored & (probability >= 0.5))).all()


def test_filter_writes_the_kept_samples_as_shards_with_an_index(pool, tmp_path, run_cli):  # noqa: F811
    import pyarrow.parquet as pq
    import webdataset as wds

    out = tmp_path / "top"
    done = run_cli("filter", "--checkpoint", pool["checkpoint"], "--input", pool["shards"], "--output-dir", str(out),
                   "--device", "cpu", "--batch-size", "5", "--top-fraction", "0.25", "--workers", "0")
    assert done.returncode == 1, done.stderr  # the damaged samples are reported
    scores = read_parquet(out / "scores.parquet")
    scored = sorted((r for r in scores.values() if r["error"] is None), key=lambda r: -r["probability"])
    expected = {r["key"] for r in scored[: -(-len(scored) // 4)]}
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert {r["key"] for r in index} == expected and len(index) == 24
    assert "kept 24 of 93 scored pairs (top 0.25)" in done.stderr

    originals = {}
    for url in expand_shards(pool["shards"]):
        for sample in wds.WebDataset(url, shardshuffle=False):
            originals[sample["__key__"]] = sample
    written = {}
    for sample in wds.WebDataset(str(out / "shards" / "*.tar").replace("*", "{00000..00003}"), shardshuffle=False,
                                 empty_check=False):
        written[sample["__key__"]] = sample
        for name in ("txt", "json", "jpg", "png"):
            if name in originals[sample["__key__"]]:
                assert sample[name] == originals[sample["__key__"]][name]  # every file, byte for byte
    assert set(written) == expected
    assert all(r["shard"].startswith(str(out / "shards")) for r in index)

    again = run_cli("filter", "--checkpoint", pool["checkpoint"], "--input", pool["shards"], "--output-dir",
                    str(out), "--device", "cpu")
    assert again.returncode == 2 and "holds a finished filter" in again.stderr

    # interrupted after scoring: the resume selects and reshards from the kept scores, the same shards
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    (out / "index.parquet").unlink()
    common = ["filter", "--checkpoint", pool["checkpoint"], "--input", pool["shards"], "--output-dir", str(out),
              "--device", "cpu", "--top-fraction", "0.25", "--workers", "0"]
    assert "add --resume" in run_cli(*common, "--batch-size", "5").stderr
    other = run_cli(*common, "--batch-size", "7", "--resume")
    assert other.returncode == 2 and "scored from other inputs, checkpoint or settings" in other.stderr
    resumed = run_cli(*common, "--batch-size", "5", "--resume")
    assert resumed.returncode == 1 and "kept 24 of 93 scored pairs" in resumed.stderr, resumed.stderr
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before
    assert pq.read_table(out / "index.parquet").to_pylist() == index


# --- training on shards ------------------------------------------------------------------------------------------

def epoch_captions(spec, rank, world, workers, epoch=0, resampled=False, num_samples=80, skip=0, backbone=None):
    from halo_embed.data.shard_training import ShardLoader, ShardPairs

    loader = ShardLoader(ShardPairs(spec), backbone.image_transform(train=True), backbone.tokenize, 4,
                         num_samples, rank, world, workers, seed=3, resampled=resampled, max_pixels=None)
    loader.set_epoch(epoch)
    if skip:
        loader.resume_at(skip)
    return [batch["captions"] for batch in loader], len(loader)


def test_an_epoch_reads_no_sample_twice_across_processes_and_workers(tmp_path, tiny_model_dirs):
    """2 processes x 2 workers, no resampling: disjoint shares, every batch full; the next epoch reorders."""
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    spec = write_pool(tmp_path / "s", 8, 12, damage=False)
    seen, shares = [], []
    for rank in (0, 1):
        batches, length = epoch_captions(spec, rank, 2, 2, backbone=backbone)
        assert length == 10 and len(batches) == 10 and all(len(b) == 4 for b in batches)
        shares.append([c for b in batches for c in b])
        seen += shares[-1]
    assert len(seen) == len(set(seen)) == 80
    later = [c for b in epoch_captions(spec, 0, 2, 2, epoch=1, backbone=backbone)[0] for c in b]
    assert later != shares[0]
    with pytest.raises(ValueError, match="fewer than processes x workers"):
        epoch_captions(write_pool(tmp_path / "few", 3, 12, damage=False), 0, 2, 2, backbone=backbone)
    resampled, _ = epoch_captions(spec, 0, 2, 2, resampled=True, num_samples=200, backbone=backbone)
    assert len(resampled) == 26  # ceil(ceil(200 / 8) / 2) * 2 batches, drawn with replacement


def test_broken_training_samples_are_counted_not_trained(tmp_path, tiny_model_dirs):
    """No caption / no image: dropped before batching; bytes that are no image: the batch shrinks. All three
    reported in the batches' errors, as the recipe counts skipped images."""
    from halo_embed.data.shard_training import ShardLoader, ShardPairs

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    spec = write_pool(tmp_path / "s", 4, 24)
    loader = ShardLoader(ShardPairs(spec), backbone.image_transform(train=False), backbone.tokenize, 4, 96, 0, 1, 0,
                         seed=0, resampled=False, max_pixels=None)
    batches = list(loader)  # one stream (no workers): 94 samples with an image and a caption, 23 batches of 4
    errors = [e for b in batches for e in b["errors"]]
    assert len(errors) == 3
    assert any(e.endswith("0000005: no caption (txt) in the sample") for e in errors)
    assert any(e.endswith("0000049: no image (jpg/png/webp) in the sample") for e in errors)
    assert any("0000027" in e and e.startswith("cannot read image") for e in errors)
    assert len(batches) == 23 and sum(len(b["captions"]) for b in batches) == 91  # one batch of 3
    trained = {c for b in batches for c in b["captions"]}
    assert not trained & {"a red shape number 5", "a green shape number 27", "a purple shape number 49"}


def test_a_resumed_epoch_replays_the_rest_of_the_stream(tmp_path, tiny_model_dirs):
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    spec = write_pool(tmp_path / "s", 4, 12, damage=False)
    for resampled in (False, True):
        whole, _ = epoch_captions(spec, 0, 1, 2, resampled=resampled, num_samples=40, backbone=backbone)
        for skip in (1, 2, 5):
            rest, _ = epoch_captions(spec, 0, 1, 2, resampled=resampled, num_samples=40, skip=skip, backbone=backbone)
            assert rest == whole[skip:], (resampled, skip)


def test_held_out_samples_never_train_and_calibrate_the_decision(tmp_path, tiny_model_dirs):
    """--calibration-split on shards: a hash of the key holds samples out of every epoch; the recipe fits the
    decision on them."""
    from halo_embed.data.shard_training import ShardPairs
    from halo_embed.recipes.clip_finetune import main

    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    spec = write_pool(tmp_path / "s", 8, 30, damage=False)
    source = ShardPairs(spec).with_holdout(0.3)
    held = [f"a {COLOURS[int(k) % 5]} shape number {int(k)}" for k in (f"{i:07d}" for i in range(240))
            if source.held_out(k)]
    assert 50 <= len(held) <= 100
    calibration = source.read(2000, held_out=True)
    assert [calibration.text_and_group(i)[0] for i in range(len(calibration))] == held
    from halo_embed.data.shard_training import ShardLoader

    loader = ShardLoader(source, backbone.image_transform(train=False), backbone.tokenize, 4, 240, 0, 1, 2, seed=0,
                         resampled=False, max_pixels=None)
    trained = [c for batch in loader for c in batch["captions"]]
    usable = 240 - len(held)  # each of the 2 workers drops its last incomplete batch of 4
    assert usable - 2 * 3 <= len(trained) <= usable and len(trained) % 4 == 0 and not set(trained) & set(held)

    args = finetune_args(tmp_path, tiny_model_dirs["open_clip_local_dir"], spec, "calibrated", "--train-num-samples",
                         "64", "--max-steps", "2", "--calibration-split", "0.3")
    assert main(args) == 0
    config = json.loads((tmp_path / "calibrated" / "final" / "config.json").read_text())
    assert config["decision"]["rule"] == "fitted" and config["decision"]["fitted_on"]["aligned"] == len(held)


def finetune_args(tmp_path, model_dir, train, name, *extra):
    return ["--model", f"local-dir:{model_dir}", "--dataset-type", "webdataset", "--train-data", train,
            "--val-data", train, "--batch-size", "8", "--eval-images", "16",
            "--adapter-samples", "32", "--output", str(tmp_path), "--name", name, "--no-progress", "--lr", "1e-3",
            "--warmup", "1", "--save-every", "2", "--log-every-n-steps", "1", *extra]


def test_finetune_trains_and_resumes_from_shards(tmp_path, tiny_model_dirs):
    """8 steps straight (epochs of 6 batches) == 2 steps, then --resume for 6 more: 2 DataLoader workers,
    damaged samples in the shards."""
    from halo_embed.recipes.clip_finetune import main

    from test_finetune import weights

    spec = write_pool(tmp_path / "s", 4, 24)
    model = tiny_model_dirs["open_clip_local_dir"]
    common = ["--train-num-samples", "48", "--max-steps", "8", "--workers", "2", "--keep-checkpoints", "9"]
    assert main(finetune_args(tmp_path, model, spec, "straight", *common)) in (0, 1)
    assert main(finetune_args(tmp_path, model, spec, "resumed", *common, "--resume",
                              str(tmp_path / "straight" / "checkpoints" / "step-0000002"))) in (0, 1)
    a, b = weights(tmp_path / "straight" / "final"), weights(tmp_path / "resumed" / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0] * 6 + [1] * 2
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())["steps"] == 8

    done = subprocess.run([sys.executable, "-m", "halo_embed.cli", "finetune", "--dataset-type", "webdataset",
                           "--train-data", spec, "--val-data", spec, "--output", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--train-num-samples is required" in done.stderr


def test_filtered_shards_train_in_two_processes(pool, tmp_path, tiny_model_dirs, run_cli):  # noqa: F811
    """`filter`'s output read back by `finetune` under torchrun --nproc_per_node 2 (gloo), and resumed."""
    import socket

    out = tmp_path / "kept"
    done = run_cli("filter", "--checkpoint", pool["checkpoint"], "--input", pool["shards"], "--output-dir", str(out),
                   "--device", "cpu", "--batch-size", "5", "--top-fraction", "0.9", "--workers", "0")
    assert done.returncode == 1, done.stderr
    shards = sorted((out / "shards").glob("*.tar"))
    spec = f"{out}/shards/{{00000..{len(shards) - 1:05d}}}.tar"
    assert f"--train-data '{spec}'" in done.stderr
    model = tiny_model_dirs["open_clip_local_dir"]

    def torchrun(*extra):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", port, "-m", "halo_embed.recipes.clip_finetune",
                               *finetune_args(tmp_path, model, spec, "two", "--workers", "1",
                                              "--train-num-samples", "64", *extra)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)

    first = torchrun("--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun("--max-steps", "4", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "resumed" not in r] == [1, 2, 3, 4]
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
