import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from halo_embed import HALOHead
from halo_embed.eval import (
    embedding_pca,
    evaluate_ood,
    expected_calibration_error,
    ood_metrics,
    ood_table,
    reliability_diagram,
    roc_curves,
    score_histograms,
    side_by_side,
    write_report,
)
from halo_embed.io import atomic_path, atomic_write_text, unused_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_evaluate_ood_with_head_scores_and_loaders():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(4, 8, generator=g) * 2
    head = HALOHead(centroids, 3.0, 0.0)
    id_x = centroids.repeat(25, 1) + 0.3 * torch.randn(100, 8, generator=g)
    near_x = 0.5 * centroids.repeat(10, 1) + 0.8 * torch.randn(40, 8, generator=g)
    far_x = 0.3 * torch.randn(60, 8, generator=g)
    loader = DataLoader(TensorDataset(id_x, torch.zeros(100, dtype=torch.long)), batch_size=32)
    results = evaluate_ood(lambda x: head(x).scores, loader, {"near": near_x, "far": far_x},
                           near=["near"], far=["far"], batch_size=16)
    assert set(results.metrics) == {"not_abstain", "msp", "neg_distance", "energy"}
    per_set = results.metrics["not_abstain"]
    assert set(per_set) == {"near", "far", "near_avg", "far_avg"}
    direct = ood_metrics(head(id_x).scores["not_abstain"], head(far_x).scores["not_abstain"])
    assert per_set["far"] == pytest.approx(direct)
    assert per_set["far_avg"]["auroc"] == pytest.approx(direct["auroc"])
    table = results.to_markdown()
    assert "FPR@95 (ID kept) %" in table and "FPR@95 (OOD caught) %" in table
    assert f"{100 * direct['auroc']:.2f}" in table


def test_ood_table_averages_and_validation():
    rng = np.random.default_rng(0)
    ids = {"s": rng.normal(1, 1, 50)}
    oods = {"a": {"s": rng.normal(0, 1, 40)}, "b": {"s": rng.normal(-1, 1, 30)}}
    results = ood_table(ids, oods, near=["a", "b"])
    avg = results.metrics["s"]["near_avg"]["auroc"]
    assert avg == pytest.approx((results.metrics["s"]["a"]["auroc"] + results.metrics["s"]["b"]["auroc"]) / 2)
    with pytest.raises(ValueError, match=r"far names OOD sets that were not given: \['c'\]"):
        ood_table(ids, oods, far=["c"])
    with pytest.raises(ValueError, match="has no score 's'"):
        ood_table(ids, {"a": {"t": rng.normal(0, 1, 4)}})


def test_plots_render(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 5, 300)
    paths = [
        reliability_diagram(expected_calibration_error(probs, labels), tmp_path / "rel.png"),
        score_histograms(rng.normal(1, 1, 200), {"ood": rng.normal(0, 1, 100)}, tmp_path / "hist.png"),
        roc_curves(rng.normal(1, 1, 200), {"a": rng.normal(0, 1, 100), "b": rng.normal(-1, 1, 50)}, tmp_path / "roc.png"),
        embedding_pca(torch.randn(200, 8), torch.randint(0, 4, (200,)), tmp_path / "pca.png",
                      centroids=torch.randn(4, 8), extra={"OOD": torch.randn(30, 8)}),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png", "pca.png", "rel.png", "roc.png"]


def test_write_report_and_side_by_side(tmp_path):
    runs = {
        "CCE": {"accuracy": 0.963, "ece": 0.0798, "auroc": 0.9251},
        "HALO": {"accuracy": 0.9653, "ece": 0.0151, "auroc": 0.9808},
        "published": {"accuracy": 0.9653},
    }
    table = side_by_side(runs, [("accuracy", "ID accuracy %"), ("ece", "ECE"), ("auroc", "SVHN AUROC %")])
    assert "| ID accuracy % | 96.30 | 96.53 | 96.53 |" in table
    assert "| ECE | 0.0798 | 0.0151 | - |" in table
    report = write_report(tmp_path / "run", "A run", {"halo": runs["HALO"], "arr": np.arange(3)},
                          sections=["## Table\n\n" + table], plots={"ROC": "roc.png"})
    text = report.read_text()
    assert text.startswith("# A run") and "![ROC](roc.png)" in text and "96.53" in text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["arr"] == [0, 1, 2]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left behind


def test_write_errors_name_the_target_not_the_temporary_file(tmp_path):
    (tmp_path / "a-folder.json").mkdir()
    with pytest.raises(OSError, match=r"cannot write .*a-folder.json: Is a directory") as error:
        atomic_write_text(tmp_path / "a-folder.json", "x")
    assert ".tmp" not in str(error.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match=r"cannot write .*file/report.md"):
        atomic_write_text(tmp_path / "file" / "report.md", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder.json", "file"]


def test_unused_path_never_names_an_existing_file(tmp_path):
    first = unused_path(tmp_path / "result.json")
    assert first == tmp_path / "result.json"
    atomic_write_text(first, "run 1")
    second = unused_path(tmp_path / "result.json")
    assert second == tmp_path / "result-2.json"
    atomic_write_text(second, "run 2")
    assert unused_path(tmp_path / "result.json") == tmp_path / "result-3.json"
    assert first.read_text() == "run 1" and second.read_text() == "run 2"


def test_atomic_write_gives_normal_permissions(tmp_path):
    # a new file gets 0666 less the umask (not mkstemp's 0600); a replaced file keeps its mode
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        fresh = atomic_write_text(tmp_path / "new.md", "x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.md"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write_text(kept, "new")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
    finally:
        os.umask(old_umask)
