"""Training on webdataset shards with open_clip_train's meanings, reproducibly.

``--dataset-type webdataset --train-data 'shards/{00000..00099}.tar'
--train-num-samples N [--dataset-resampled]``:

- An *epoch* is ``--train-num-samples`` samples (shards have no length):
  each process takes ``ceil(N / (batch * processes))`` batches, rounded up to a
  multiple of its DataLoader workers, every worker the same share.
- Without ``--dataset-resampled`` each epoch shuffles the shard list (seeded
  by ``(seed, epoch)``), process ``r`` of ``P`` takes shards ``r, r + P, ...``
  and its worker ``w`` of ``W`` every ``W``-th of those: no sample is read
  twice in an epoch. This needs at least ``P * W`` shards (open_clip's rule).
  A worker whose shards run out ends its epoch early; with several processes
  every process then ends the epoch at the same step (the first one out), so
  none waits for the others' gradients.
- With ``--dataset-resampled`` every worker draws shards with replacement
  from its own seeded generator, forever; the epoch is the count alone.
- Samples pass a seeded shuffle buffer (per epoch, process and worker), then
  form batches of ``--batch-size`` samples. A sample without an image or a
  caption is dropped, an image that does not decode shrinks its batch; both
  are counted as skipped training images (``--strict-images``: an error).
- Each sample's augmentation is seeded by its position in the stream.

Resume: the stream is a function of ``(seed, epoch, process, worker)``, so a
resumed run replays the epoch's batches in the interrupted run's order: each
worker reads and drops the samples of the batches it had delivered (without
decoding their images) and the loader drops the few batches of an unfinished
round of workers. This is exact when every worker delivered its full share
(always with ``--dataset-resampled``); if a worker had run out of shards
before the interruption, the rest of that epoch can differ.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .images import DEFAULT_MAX_PIXELS, ImageLoadError
from .pairs import collate_pairs, training_sample
from .shards import CAPTION_KEY, IMAGE_KEYS, RawPair, Unit, UnitReport, expand_shards, read_unit

__all__ = ["MemoryPairs", "ShardLoader", "ShardPairs", "ShardStream"]

#: samples in each worker's shuffle buffer (open_clip_train uses 5000 at full scale; memory: encoded images)
SHUFFLE_BUFFER = 1000
#: held-out samples read for the decision's calibration (--calibration-split) at most
CALIBRATION_IMAGES = 2000
#: samples without an image or caption in a row before the stream gives up (wrong keys, not a few bad samples)
UNUSABLE_IN_A_ROW = 10_000


def _stable_hash(*parts: Any) -> int:
    """A 62-bit hash that is the same in every process and Python run (``hash()`` is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class MemoryPairs:
    """A few pairs read from shards into memory, as a pair source (:mod:`halo_embed.data.pairs`): encoded
    image bytes, the caption, and one group per sample."""

    def __init__(self, samples: list[tuple[bytes, str, str]]) -> None:
        self.samples = samples  # (image bytes, caption, "url:key")
        self.bad_rows: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[bytes, str, int]:
        image, caption, _ = self.samples[index]
        return image, caption, index

    def text_and_group(self, index: int) -> tuple[str, int]:
        return self.samples[index][1], index

    def image_key(self, index: int) -> str:
        return self.samples[index][2]


class ShardPairs:
    """A webdataset source for training: its shards, and which samples are held out.

    Args:
        spec: the shards (see :func:`~halo_embed.data.shards.expand_shards`).
        what: the option that named them, for messages.
        holdout: share of the samples held out (never trained on), chosen by a hash of the sample's key
            (stable under any shard order, location, process or worker count).
        seed: seeds that choice.
    """

    def __init__(self, spec: str, what: str = "--train-data", holdout: float = 0.0, seed: int = 0) -> None:
        self.spec, self.urls = spec, expand_shards(spec, what)
        self.holdout, self.seed = holdout, seed
        self.bad_rows: list[str] = []  # broken samples are counted as skipped images, per epoch

    def held_out(self, key: str) -> bool:
        # the key alone: the same split when shards are moved, renamed or listed in another order
        return self.holdout > 0 and _stable_hash(self.seed, "holdout", key) < self.holdout * 2 ** 62

    def with_holdout(self, holdout: float) -> "ShardPairs":
        held = ShardPairs.__new__(ShardPairs)
        held.__dict__.update(self.__dict__)
        held.holdout = holdout
        return held

    def read(self, limit: int, held_out: bool = False) -> MemoryPairs:
        """The first ``limit`` usable samples in shard order, of the held-out part or of the rest."""
        samples: list[tuple[bytes, str, str]] = []
        for url in self.urls:
            for raw in read_unit(Unit(url), UnitReport()):
                if raw.error is None and self.held_out(raw.key) == held_out:
                    samples.append((raw.image, raw.text, f"{url}:{raw.key}"))
                    if len(samples) >= limit:
                        return MemoryPairs(samples)
        return MemoryPairs(samples)


class ShardStream(IterableDataset):
    """The batches of one process's share of an epoch (see the module docstring).

    Args:
        source: the shards.
        transform: PIL image -> tensor (the backbone's training transform).
        tokenize: captions -> tokens (run in the worker).
        batch_size: samples per batch.
        worker_batches: batches each worker yields per epoch.
        rank / world: this process and the process count.
        seed: seeds shard order, shuffle buffers and augmentation.
        resampled: draw shards with replacement.
    """

    def __init__(self, source: ShardPairs, transform: Callable, tokenize: Callable, batch_size: int,
                 worker_batches: int, rank: int = 0, world: int = 1, seed: int = 0, resampled: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.source, self.transform, self.tokenize = source, transform, tokenize
        self.batch_size, self.worker_batches, self.rank, self.world = batch_size, worker_batches, rank, world
        self.seed, self.resampled, self.max_pixels = seed, resampled, max_pixels
        self.epoch, self.skip = 0, 0  # skip: batches each worker drops at the start of the epoch (a resume)

    def worker_shards(self, worker: int, workers: int) -> Iterator[str]:
        urls = self.source.urls
        if self.resampled:
            rng = random.Random(_stable_hash(self.seed, "resample", self.epoch, self.rank, worker))
            while True:
                yield rng.choice(urls)
        order = list(urls)
        random.Random(_stable_hash(self.seed, "shards", self.epoch)).shuffle(order)
        yield from order[self.rank :: self.world][worker::workers]

    def _samples(self, worker: int, workers: int) -> Iterator[tuple[str, RawPair]]:
        for url in self.worker_shards(worker, workers):
            for raw in read_unit(Unit(url), UnitReport()):  # a damaged tar: its readable samples, then the next
                if not self.source.held_out(raw.key):
                    yield url, raw

    def _shuffled(self, worker: int, workers: int) -> Iterator[tuple[str, RawPair]]:
        rng = random.Random(_stable_hash(self.seed, "buffer", self.epoch, self.rank, worker))
        buffer: list[tuple[str, RawPair]] = []
        for item in self._samples(worker, workers):
            buffer.append(item)
            if len(buffer) >= SHUFFLE_BUFFER:
                position = rng.randrange(len(buffer))
                buffer[position], buffer[-1] = buffer[-1], buffer[position]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, url: str, raw: RawPair, draw: int) -> dict[str, Any]:
        return training_sample(raw.image, raw.text, _stable_hash(url, raw.key), self.transform,
                               self.seed * 1_000_003 + draw, self.max_pixels, name=f"{url}:{raw.key}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream_id = _stable_hash(self.seed, "draws", self.epoch, self.rank, worker) % 2 ** 40
        pending: list[tuple[str, RawPair]] = []
        dropped: list[str] = []
        delivered = 0
        for url, raw in self._shuffled(worker, workers):
            if raw.error is not None:  # no image or caption: known without decoding, so a resume drops it too
                dropped.append(f"{url}:{raw.key}: {raw.error}")
                if len(dropped) > UNUSABLE_IN_A_ROW:  # resampled shards of nothing usable would never end
                    raise ImageLoadError(f"{len(dropped)} samples in a row without an image or caption, e.g. "
                                         f"{dropped[0]} (image keys {'/'.join(IMAGE_KEYS)}, caption key "
                                         f"{CAPTION_KEY})")
                continue
            pending.append((url, raw))
            if len(pending) < self.batch_size:
                continue
            if delivered >= self.skip:
                samples = [self._decode(u, r, stream_id * 2 ** 20 + delivered * self.batch_size + i)
                           for i, (u, r) in enumerate(pending)]
                batch = collate_pairs(samples, self.tokenize)
                batch["errors"] = dropped + batch["errors"]
                yield batch
            delivered += 1
            pending, dropped = [], []
            if delivered >= self.worker_batches:
                return


class ShardLoader:
    """What the training loop iterates for webdataset data: ``len()`` (batches per epoch on this process),
    ``set_epoch``, ``resume_at(batches)`` and batches already on ``device``."""

    def __init__(self, source: ShardPairs, transform: Callable, tokenize: Callable, batch_size: int,
                 num_samples: int, rank: int, world: int, workers: int, seed: int, resampled: bool,
                 max_pixels: int | None, device: torch.device | str = "cpu") -> None:
        self.workers = max(1, workers)
        if not resampled and len(source.urls) < world * self.workers:
            raise ValueError(f"--train-data has {len(source.urls)} shard(s), fewer than processes x workers "
                             f"({world} x {self.workers}): give more shards, fewer --workers, or "
                             "--dataset-resampled")
        worker_batches = math.ceil(math.ceil(num_samples / (batch_size * world)) / self.workers)
        self.dataset = ShardStream(source, transform, tokenize, batch_size, worker_batches, rank, world, seed,
                                   resampled, max_pixels)
        self.num_workers, self.device, self.discard = workers, torch.device(device), 0
        self.batches_per_epoch = worker_batches * self.workers

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def resume_at(self, batches: int) -> None:
        """Start the current epoch after its first ``batches`` batches (a resumed run)."""
        self.dataset.skip, self.discard = divmod(batches, self.workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from ..clip.backbones import move_tokens

        epoch = copy.copy(self.dataset)  # this epoch's stream keeps its skip; the next epoch starts at 0
        discard, self.discard, self.dataset.skip = self.discard, 0, 0
        loader = DataLoader(epoch, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None)
        for position, batch in enumerate(loader):
            if position < discard:  # the unfinished round of workers before the interruption
                continue
            if batch["pixels"] is not None:
                batch["pixels"] = batch["pixels"].to(self.device, non_blocking=True)
                batch["tokens"] = move_tokens(batch["tokens"], self.device)
                batch["image_ids"] = batch["image_ids"].to(self.device)
            yield batch
