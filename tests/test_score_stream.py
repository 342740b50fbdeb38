"""`halo-embed score --pairs` as a stream: workers, the journal, a kill and a resume that gives the same output."""

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
from halo_embed.clip.pair_stream import JOURNAL_FORMAT, ScoreJournal
from test_clip import calibrated, run_cli  # noqa: F401  (run_cli is a fixture)

CAPTIONS = ["a red circle", "a blue square in the corner", "a small green triangle", "a big yellow star"]


@pytest.fixture(scope="module")
def scoring_inputs(tiny_model_dirs, tmp_path_factory):
    """A calibrated checkpoint, 12 images and a pairs CSV of 600 rows (one image missing)."""
    root = tmp_path_factory.mktemp("stream")
    backbone = load_backbone("open_clip", f"local-dir:{tiny_model_dirs['open_clip_local_dir']}")
    checkpoint = save_checkpoint(calibrated(backbone), root / "ckpt")
    for i, image in enumerate(shape_images(12, size=64)):
        image.save(root / f"img{i}.png")
    rows = [f"img{i % 12}.png,{CAPTIONS[i % 4]} {i}" for i in range(600)]
    rows[500] = "missing.png,a dog"
    pairs = root / "pairs.csv"
    pairs.write_text("image,caption\n" + "\n".join(rows) + "\n")
    return {"root": root, "checkpoint": checkpoint, "pairs": pairs, "context": backbone.context_length}


def score_args(inputs, output, *extra):
    return ["score", "--checkpoint", str(inputs["checkpoint"]), "--pairs", str(inputs["pairs"]), "--output",
            str(output), "--device", "cpu", "--batch-size", "4", "--workers", "0", *extra]


def test_a_killed_run_resumes_to_the_same_output(scoring_inputs, tmp_path, run_cli):  # noqa: F811
    full = tmp_path / "full.csv"
    done = run_cli(*score_args(scoring_inputs, full))
    assert done.returncode == 1, done.stderr  # the missing image
    assert "scored 599 of 600 pairs" in done.stderr and "pairs/s" in done.stderr

    part = tmp_path / "part.csv"
    journal = tmp_path / "part.csv.partial.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "halo_embed.cli", *score_args(scoring_inputs, part)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") > 50:
            break
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be killed: make the test's input longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert journal.exists() and not part.exists()
    lines = journal.read_bytes().count(b"\n") - 1
    assert 50 <= lines < 600
    with open(journal, "ab") as handle:  # a row cut off in the middle of its write
        handle.write(b'{"row": 999, "line": 1000, "ima')

    # the journal is only ever continued on purpose, and with the same settings
    again = run_cli(*score_args(scoring_inputs, part))
    assert again.returncode == 2 and "add --resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    other = run_cli(*score_args(scoring_inputs, part, "--resume", "--strict-text"))
    assert other.returncode == 2 and "strict_text" in other.stderr and "differ" in other.stderr

    # another --batch-size on resume: the rest is scored in the interrupted run's batches (a row's last float
    # bits depend on its batch), so the output is still the uninterrupted run's, byte for byte
    resumed = run_cli(*score_args(scoring_inputs, part, "--resume", "--batch-size", "16"))
    assert resumed.returncode == 1, resumed.stderr
    assert "resuming with the interrupted run's --batch-size 4 (not 16)" in resumed.stderr
    kept = lines - lines % 4
    assert f"resuming {journal}: {kept} of 600 rows were scored before" in resumed.stderr
    assert "scored 599 of 600 pairs" in resumed.stderr
    assert part.read_bytes() == full.read_bytes()
    assert not journal.exists()
    # a finished output is never overwritten
    over = run_cli(*score_args(scoring_inputs, part))
    assert over.returncode == 2 and "already exists" in over.stderr and part.read_bytes() == full.read_bytes()


def test_workers_and_stdout_give_the_same_scores(scoring_inputs, tmp_path, run_cli):  # noqa: F811
    args = ["score", "--checkpoint", str(scoring_inputs["checkpoint"]), "--pairs", str(scoring_inputs["pairs"]),
            "--device", "cpu", "--batch-size", "16"]
    by_main = run_cli(*args, "--workers", "0", "--output", str(tmp_path / "main.json"))
    by_workers = run_cli(*args, "--workers", "2", "--output", str(tmp_path / "workers.json"))
    assert by_main.returncode == by_workers.returncode == 1
    assert (tmp_path / "main.json").read_text() == (tmp_path / "workers.json").read_text()
    scores = json.loads((tmp_path / "main.json").read_text())
    assert [p["row"] for p in scores["pairs"]] == list(range(1, 601))
    assert scores["pairs"][500]["error"].startswith("image file not found")
    # one error line per bad row, in row order, from either path
    assert by_main.stderr.count("image file not found") == by_workers.stderr.count("image file not found") == 1
    printed = run_cli(*args, "--workers", "2")
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert lines == scores["pairs"]
    for bad, message in [(("--workers", "-1"), "--workers must be >= 0"),
                         (("--resume",), "--resume needs --output")]:
        result = run_cli(*args, *bad)
        assert result.returncode == 2 and message in result.stderr


def test_journal_resumes_at_the_last_complete_batch(tmp_path):
    path = tmp_path / "scores.csv.partial.jsonl"
    header = {"pairs": ["p.csv", 10, 1], "strict_text": False}
    journal = ScoreJournal(path, header, batch_size=4)
    journal.start()
    journal.append([{"row": i} for i in range(1, 11)])  # two whole batches of 4 and half of a third
    journal.close()
    with open(path, "ab") as handle:
        handle.write(b'{"row": 1')
    resumed = ScoreJournal(path, header, batch_size=8)
    assert resumed.resume() == 8
    resumed.append([{"row": 9}])
    resumed.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": JOURNAL_FORMAT, "batch_size": 4, **header}
    assert [json.loads(line)["row"] for line in lines[1:]] == list(range(1, 10))
    with pytest.raises(ValueError, match=r"other inputs or settings \(strict_text differ\)"):
        ScoreJournal(path, {**header, "strict_text": True}, batch_size=4).resume()
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="is not a halo-embed score journal"):
        ScoreJournal(path, header, batch_size=4).resume()


@pytest.mark.parametrize("family", ["open_clip", "transformers"])
def test_tokenize_checked_is_tokenize_and_truncated(tiny_model_dirs, family):
    name = f"local-dir:{tiny_model_dirs['open_clip_local_dir']}" if family == "open_clip" else tiny_model_dirs["hf"]
    backbone = load_backbone(family, str(name))
    texts = ["a red circle", "a square " * (3 * backbone.context_length)]
    tokens, flags = backbone.tokenize_checked(texts)
    expected = backbone.tokenize(texts)
    for got, want in ((tokens, expected),) if not isinstance(expected, dict) else \
            ((tokens[k], expected[k]) for k in expected):
        assert torch.equal(got, want)
    assert flags.tolist() == backbone.truncated(texts).tolist() == [False, True]


def test_one_process_per_output(scoring_inputs, tmp_path, run_cli):  # noqa: F811
    """A second `score` on an output that a live process writes stops before it reads or writes anything; a
    holder that dies (SIGKILL) leaves no claim behind."""
    from halo_embed.io import claim, claim_for

    output, lock = tmp_path / "scores.csv", tmp_path / "scores.csv.lock"
    with claim_for(output, "the test's run"):
        busy = run_cli(*score_args(scoring_inputs, output, "--resume"))
    assert busy.returncode == 2 and "is in use by pid" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == []
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom halo_embed.io import claim\n"
         "with claim(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with claim(lock, "the test's run"):  # the kernel released the dead holder's lock
        pass
    assert not lock.exists()


_CONTENDER = """
import os, sys, time
from halo_embed.io import ClaimedError, claim
lock, inside, overlaps = sys.argv[1], sys.argv[2], 0
deadline, held = time.monotonic() + 1.5, 0
while time.monotonic() < deadline:
    try:
        with claim(lock, "x"):
            try:
                os.close(os.open(inside, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                overlaps += 1
                continue
            held += 1
            time.sleep(0.001)
            os.unlink(inside)
    except ClaimedError:
        pass
print(held, overlaps)
"""


def test_claims_never_overlap_under_contention(tmp_path):
    """Four processes claim and release one lock as fast as they can: a holder unlinks the lock file as it
    leaves, and a process that opened the old file before that must not count as holding the new one."""
    lock, inside = tmp_path / "run.lock", tmp_path / "inside"
    contenders = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(lock), str(inside)],
                                   stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = [tuple(map(int, c.communicate(timeout=60)[0].split())) for c in contenders]
    assert sum(held for held, _ in results) > 20, results  # the lock did change hands
    assert all(overlaps == 0 for _, overlaps in results), results
