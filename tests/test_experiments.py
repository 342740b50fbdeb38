"""The experiment scripts keep working: each one's ``--smoke`` mode (``SMOKE=1`` for the shell scripts) runs here
on a generated miniature of ../shared/datasets and must finish and write its results (the numbers mean nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

#: script -> (its arguments besides --smoke, what its smoke run must write under --runs)
PYTHON_SMOKES = {
    "digits_seeds.py": ([], "dynamics/digits_seeds.json"),
    "cifar_halo_dynamics.py": ([], "dynamics/cifar10.json"),
    "cifar_rounding_spread.py": ([], "dynamics/rounding_spread.json"),
    "cifar_candidates.py": ([], "dynamics/candidates.json"),
    "cifar_decision_geometry.py": ([], "geometry-smoke/cifar-cifar10/halo/report.md"),
    "reference_agreement.py": ([], None),
    "tinyimagenet_zeroshot.py": ([], "zeroshot/tinyimagenet.json"),
    "lit_pretrain.py": ([], "lit-smoke/pretrain.json"),
    "pretrained_workflow.py": (["all"], "workflow-smoke/report.md"),
    "small_data_preset.py": ([], "small_data-smoke/small_data_grid.json"),
    "real_start.py": (["run", "posthoc", "report"], "real-smoke/report-heads.md"),
    "openclip_parity.py": ([], "parity-smoke/parity.md"),
    "pair_diagnostics.py": ([], "pair-diagnostics-smoke/config.json"),
    "flickr_shards.py": ([], "flickr-shards-smoke/report.json"),
}
SHELL_SMOKES = {
    "cifar_recipe.sh": "cifar-small/report.md",
    "cifar_temperature.sh": "cifar-small-tlr10-const/halo/report.md",
    "tinyimagenet_split.sh": "tinyimagenet100/report.md",
    "shapes.sh": "shapes/report.md",
    "cifar10_captions.sh": "cifar10-captions/report.md",
    "flickr_minilm.sh": "flickr-minilm/report.md",
    "pair_normalization.sh": "cifar10-captions-norm-running-terms/report.md",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One --runs folder for every smoke run here: the generated datasets and the pretrained stand-in that
    lit_pretrain.py makes are built once and read by the scripts after it (each writes its own folders)."""
    return tmp_path_factory.mktemp("smoke-runs")


def test_every_experiment_is_accounted_for():
    scripts = {p.name for p in EXPERIMENTS.iterdir() if p.suffix in (".py", ".sh") and not p.name.startswith("_")}
    assert scripts == set(PYTHON_SMOKES) | set(SHELL_SMOKES)  # a new script comes with its smoke mode


def _environment(runs: Path) -> dict[str, str]:
    return {**os.environ, "RUNS": str(runs), "PYTHON": sys.executable,
            "HALO_EMBED": str(Path(sys.executable).parent / "halo-embed"), "SMOKE": "1"}


@pytest.mark.parametrize("script", sorted(PYTHON_SMOKES))
def test_python_experiment_smoke(script, runs):
    arguments, expected = PYTHON_SMOKES[script]
    result = subprocess.run([sys.executable, str(EXPERIMENTS / script), *arguments, "--smoke", "--runs", str(runs)],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=_environment(runs))
    assert result.returncode == 0, result.stderr[-2000:]
    if expected is not None:
        assert (runs / expected).is_file(), sorted(str(p.relative_to(runs)) for p in runs.glob("*"))
    if expected and expected.endswith(".json"):
        assert json.loads((runs / expected).read_text())


@pytest.mark.parametrize("script", sorted(SHELL_SMOKES))
def test_shell_experiment_smoke(script, runs):
    result = subprocess.run(["bash", str(EXPERIMENTS / script)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=_environment(runs))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (runs / SHELL_SMOKES[script]).is_file()


def test_a_missing_data_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(EXPERIMENTS / "cifar_halo_dynamics.py"), "--data",
                             str(tmp_path / "absent"), "--runs", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"--data {tmp_path / 'absent'}: no such folder (a copy laid out like ../shared/datasets; "
        "HALO_EMBED_DATA sets the default)"]
