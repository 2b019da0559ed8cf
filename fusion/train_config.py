"""The optimisation options of a training run, apart from the loop (no torch import: the
command line reads them for its --help)."""

from __future__ import annotations

from dataclasses import dataclass

from vlpipe.config import DEVICE_HELP, opt

# adamw: AdamW, no decay on biases / norms, linear warm-up then decay (the default).
# bertadam: BertAdam on all parameters with warmup_linear, as LXMERT's `--optim bert` recipes.
OPTIMIZERS = ("adamw", "bertadam")


@dataclass
class TrainConfig:
    """The optimisation of a run (the `[optim]` section of a train config); presets set these
    per fusion and task (vlpipe/presets)."""

    epochs: int = opt(4, "passes over the training examples", minimum=1)
    batch_size: int = opt(
        32, "examples per forward pass (per process under torchrun); see --grad-accum", minimum=1
    )
    grad_accum: int = opt(
        1,
        "batches per optimizer step (effective batch: batch size x this x processes); steps, "
        "as --max-steps, --val-every, the schedule and the log count them, are optimizer steps",
        minimum=1,
    )
    lr: float = opt(5e-5, "peak learning rate", minimum=0.0)
    encoder_lr: float | None = opt(
        None,
        "peak learning rate of the encoder blocks --tune-top trains (default: --lr; "
        "pretrained layers usually take a lower one, e.g. 1e-5)",
        minimum=0.0,
    )
    optimizer: str = opt(
        "adamw",
        "adamw (no decay on biases / norms) | bertadam (LXMERT's --optim bert)",
        choices=OPTIMIZERS,
    )
    weight_decay: float = opt(0.01, "weight decay", minimum=0.0)
    warmup_ratio: float = opt(0.1, "share of the steps spent warming up", minimum=0.0, maximum=1.0)
    grad_clip: float = opt(5.0, "clip the gradient norm at this (0: no clipping)", minimum=0.0)
    seed: int = opt(0, "seed of the initial weights, data order and dropout")
    num_workers: int = opt(0, "DataLoader worker processes reading the caches", minimum=0)
    ckpt_every: int = opt(0, "steps between checkpoints (0: at the end of each epoch)", minimum=0)
    val_every: int = opt(
        0,
        "steps between validations, each one checkpointed (0: at the end of each epoch); with N "
        "> 0 the last step of the last epoch is validated too, epoch ends are not",
        minimum=0,
    )
    early_stop: int = opt(
        0,
        "stop after this many validations in a row that do not beat the best headline metric by "
        "more than --early-stop-delta (0: never)",
        minimum=0,
    )
    early_stop_delta: float = opt(
        0.0, "the improvement (in metric points) --early-stop counts as one", minimum=0.0
    )
    device: str = opt("auto", DEVICE_HELP)
    amp: bool = opt(True, "bf16 autocast (CUDA only)")
    max_steps: int = opt(0, "stop after this many steps, resumable (0: all epochs)", minimum=0)
