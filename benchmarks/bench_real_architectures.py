"""One fine-tuning step of a real CLIP architecture on the CPU: HALO against open_clip's ClipLoss.

Usage: python benchmarks/bench_real_architectures.py [--model ViT-B-32] [--batch-size 8] [--repeats 5]

The open_clip architecture (random weights: nothing is downloaded) is built
through the library API as ``halo-embed finetune`` builds it
(``halo_embed.clip.load_backbone``, then ``HALOCLIP`` with the recipe's default
loss settings, its adapter calibrated on the batch; or
``ContrastiveCLIP(backbone, "clip")``, open_clip's ``ClipLoss``), both from the
same initial weights (seed 0). A step is forward + backward + AdamW step (the
recipe's parameter groups) on the same batch of rendered shapes at the model's
own resolution (224 px for ViT-B-32).

Time: median of ``--repeats`` steps per loss after one warm-up step each,
the two losses alternating in this process. Memory, in a fresh process per loss
(glibc told to map every block above 64 KiB on its own, so freed tensors leave
the resident set; see ``_common.extra_peak_in_subprocess``): the resident set
once the model and batch are built, the peak of the whole process over a
warm-up step and one more step (weights + AdamW state + activations), and the
peak one steady-state step adds on top of what exists before it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from _common import _reset_peak_rss, _status_mb, interleaved_times, print_table, save

LOSSES = ("halo", "clip")


def build(model_name: str, loss: str, batch_size: int):
    """(model, optimizer, batch) as the fine-tuning recipe would make them; the same weights for either loss."""
    from halo_embed.clip import HALOCLIP, ContrastiveCLIP, load_backbone, parameter_groups
    from halo_embed.data.shapes import ShapesDataset
    from halo_embed.recipes.finetune_config import FinetuneConfig

    defaults = FinetuneConfig()
    torch.manual_seed(defaults.seed)
    backbone = load_backbone("open_clip", model_name)
    data = ShapesDataset("train", batch_size, seed=0, captions_per_image=1)
    transform = backbone.image_transform(train=False)
    items = [data[i] for i in range(batch_size)]
    batch = (torch.stack([transform(image) for image, _, _ in items]),
             backbone.tokenize([caption for _, caption, _ in items]),
             torch.tensor([group for _, _, group in items]))
    if loss == "halo":
        model = HALOCLIP(backbone, num_candidates=batch_size, symmetric=defaults.symmetric, distill=defaults.distill,
                         label_smoothing=defaults.label_smoothing, rejection_weight=defaults.rejection_weight,
                         norm_weight=defaults.norm_weight, normalization=defaults.normalization,
                         momentum=defaults.normalization_momentum)
        model.fit_adapter([batch[:2]])
    else:
        model = ContrastiveCLIP(backbone, "clip")
    optimizer = torch.optim.AdamW(parameter_groups(model, defaults.wd), lr=defaults.lr,
                                  betas=(defaults.beta1, defaults.beta2), eps=defaults.eps)
    return model.train(), optimizer, batch


def step(state) -> None:
    model, optimizer, (pixels, tokens, ids) = state
    model(pixels, tokens, ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_worker(model_name: str, loss: str, batch_size: int) -> None:
    state = build(model_name, loss, batch_size)
    built = _status_mb("VmRSS")
    step(state)  # warm-up: AdamW allocates its state here
    before = _status_mb("VmRSS")
    resettable = _reset_peak_rss()
    step(state)
    peak = _status_mb("VmHWM")  # the whole process's peak (over both steps, if the mark could not be reset)
    print(json.dumps({"built_mb": built, "peak_mb": peak, "step_extra_mb": peak - before if resettable else None}))


def memory_in_subprocess(model_name: str, loss: str, batch_size: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--memory-worker", model_name, loss, str(batch_size)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
        memory_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip architecture (random weights)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per loss (after one warm-up step)")
    args = parser.parse_args()

    states = {loss: build(args.model, loss, args.batch_size) for loss in LOSSES}
    times = interleaved_times({loss: (lambda s=state: step(s)) for loss, state in states.items()},
                              repeats=args.repeats, warmup=1)
    del states
    memory = {loss: memory_in_subprocess(args.model, loss, args.batch_size) for loss in LOSSES}

    def mib(value):
        return "n/a" if value is None else f"{value:.0f}"

    print(f"{args.model}, batch {args.batch_size}, forward + backward + AdamW step, {torch.get_num_threads()} threads "
          f"(median of {args.repeats} steps after 1 warm-up)")
    print_table(["loss", "s / step", "time ratio", "RSS built MiB", "peak RSS MiB", "step extra peak MiB"],
                [[loss, f"{times[loss]:.2f}", f"{times[loss] / times['clip']:.2f}", mib(memory[loss]["built_mb"]),
                  mib(memory[loss]["peak_mb"]), mib(memory[loss]["step_extra_mb"])] for loss in LOSSES])
    ratio = times["halo"] / times["clip"]
    peak_ratio = memory["halo"]["peak_mb"] / memory["clip"]["peak_mb"]
    print(f"HALO / ClipLoss: step time {ratio:.3f}, peak RSS {peak_ratio:.3f}")
    save(f"real_architectures_{args.model}", {"args": vars(args), "seconds_per_step": times, "memory_mb": memory,
                                              "time_ratio": ratio, "peak_rss_ratio": peak_ratio})


if __name__ == "__main__":
    main()
