"""Features of a locked tower, computed once: a locked image or text tower is a fixed function.

With a tower locked (LiT, Zhai et al. 2022) only what comes after it trains,
so the locked part gives the same output for the same input every epoch, for
every WiSE-FT alpha and for the evaluation before and after training.
:class:`FeatureCache` keeps those outputs:

- keyed by the **exact input** (the bytes of the transformed pixels of one
  image, or of one caption's token ids) inside a namespace that is a hash of
  the locked part's weights and class. A changed transform, image, tokenizer or
  weight gives another key, so the cache is never stale; a random
  augmentation gives a new key every draw, so the recipe caches image
  features only when the training transform is deterministic.
- in memory, and in a folder (``directory``) as safetensors shards written
  atomically, so that a resumed run, its evaluation and its WiSE-FT sweep
  reuse them; several runs may share a folder.

What counts as the locked part is the backbone's business
(:meth:`~halo_embed.clip.backbones.CLIPBackbone.locked_split`): the whole
tower when all its weights are frozen, or its frozen trunk when only a
projection after it trains (open_clip's timm towers, whose ``head`` follows a
``trunk``, and its Hugging Face text towers, whose ``proj`` follows the
transformer and pooler).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["FeatureCache", "module_fingerprint"]

#: pending rows written to a new shard once there are this many (and at every flush)
SHARD_ROWS = 4096


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """A hash of a module's class, parameters and buffers (names, dtypes, shapes and bytes) and ``extra``."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}|{extra}".encode())
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"|{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:20]


def _row_keys(inputs: Tensor | dict[str, Tensor]) -> list[bytes]:
    """One digest per row of the exact input (pixels, or token ids and attention mask)."""
    parts = [inputs[k] for k in sorted(inputs)] if isinstance(inputs, dict) else [inputs]
    rows = [p.detach().cpu().contiguous().reshape(p.shape[0], -1) for p in parts]
    keys = []
    for i in range(rows[0].shape[0]):
        digest = hashlib.blake2b(digest_size=20)
        for row in rows:
            digest.update(row[i].view(torch.uint8).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def _batch_size(inputs: Tensor | dict[str, Tensor]) -> int:
    return next(iter(inputs.values())).shape[0] if isinstance(inputs, dict) else inputs.shape[0]


def _select(inputs: Tensor | dict[str, Tensor], rows: list[int]) -> Tensor | dict[str, Tensor]:
    index = torch.tensor(rows, dtype=torch.long)
    if isinstance(inputs, dict):
        return {k: v[index.to(v.device)] for k, v in inputs.items()}
    return inputs[index.to(inputs.device)]


class FeatureCache:
    """Outputs of locked tower parts, per exact input (see the module docstring).

    Args:
        directory: folder of the persisted shards (``None``: memory only).

    Attributes:
        hits / misses: rows served from the cache / computed, since construction.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._rows: dict[str, dict[bytes, Tensor]] = {}
        self._pending: dict[str, list[bytes]] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"FeatureCache(directory={self.directory}, rows={sum(map(len, self._rows.values()))})"

    def _namespace(self, namespace: str) -> dict[bytes, Tensor]:
        if namespace not in self._rows:
            self._rows[namespace] = {}
            self._pending[namespace] = []
            if self.directory is not None:
                self._load(namespace)
        return self._rows[namespace]

    def _load(self, namespace: str) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = self.directory / namespace
        if not folder.is_dir():
            return
        rows = self._rows[namespace]
        for shard in sorted(folder.glob("*.safetensors")):
            try:
                tensors = load_file(str(shard))
                keys, features = tensors["keys"], tensors["features"]
            except (SafetensorError, OSError, KeyError):
                continue  # a damaged shard only costs recomputing its rows
            for key, feature in zip(keys, features):
                rows[bytes(key.numpy().tobytes())] = feature

    def features(self, namespace: str, inputs: Tensor | dict[str, Tensor],
                 compute: Callable[[Tensor | dict[str, Tensor]], Tensor]) -> Tensor:
        """The output of ``compute`` for each row of ``inputs``, computing only the rows not seen before.

        Args:
            namespace: identifies the locked part (:func:`module_fingerprint` of it).
            inputs: ``(B, ...)`` pixels or token ids, or a dict of such tensors.
            compute: the locked part: ``inputs -> (B, F)`` (run without gradients).

        Returns:
            ``(B, F)`` on the inputs' device, in the computed dtype.
        """
        rows = self._namespace(namespace)
        keys = _row_keys(inputs)
        first_rows = {key: i for i, key in reversed(list(enumerate(keys))) if key not in rows}
        missing = sorted(first_rows.values())  # each new input once, however often the batch repeats it
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            with torch.no_grad():
                computed = compute(_select(inputs, missing) if len(missing) < len(keys) else inputs)
            for i, feature in zip(missing, computed.detach().cpu()):
                rows[keys[i]] = feature.clone()
                self._pending[namespace].append(keys[i])
            if len(self._pending[namespace]) >= SHARD_ROWS:
                self._write(namespace)
        device = next(iter(inputs.values())).device if isinstance(inputs, dict) else inputs.device
        return torch.stack([rows[key] for key in keys]).to(device)

    def flush(self) -> None:
        """Write every row computed since the last flush to the folder (one shard per namespace)."""
        for namespace in list(self._pending):
            self._write(namespace)

    def _write(self, namespace: str) -> None:
        from safetensors.torch import save_file

        from ..io import atomic_path

        pending = self._pending.get(namespace) or []
        if self.directory is None or not pending:
            if self.directory is None:
                pending.clear()
            return
        rows = self._rows[namespace]
        keys = torch.tensor([list(key) for key in pending], dtype=torch.uint8)
        features = torch.stack([rows[key] for key in pending]).contiguous()
        folder = self.directory / namespace
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.safetensors") as tmp:
            save_file({"keys": keys, "features": features}, str(tmp))
        pending.clear()
