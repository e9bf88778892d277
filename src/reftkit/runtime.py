"""What every command runs on, as plain functions: the accelerator, data and model loading, the
optimiser, the epoch loop's batches and the metrics file."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, set_seed
from transformers import PreTrainedModel, get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from reftkit.checkpoints import NonFiniteError, RunError
from reftkit.config import DataOptions, RunOptions, TrainerOptions
from reftkit.cot import CotStyle
from reftkit.data.records import Example
from reftkit.lora import add_lora
from reftkit.model import enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from reftkit.prompts import prompt_text, response_text
from reftkit.tiny import build_model, build_tokenizer

log = logging.getLogger("reftkit")
# accelerate warns on every save that tied embeddings are stored once; that is expected for
# tied models (from_pretrained re-ties them), so the warning only buries real ones.
logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())


def cpu_multiprocess() -> bool:
    """Several processes (`accelerate launch --multi_gpu`, torchrun) but no CUDA: accelerate only
    sets up its gloo CPU backend when asked for the CPU, so ask for it exactly then."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> PartialState:
    """The process group (rank, world size); the same one the trainers' Accelerator uses."""
    return PartialState(cpu=cpu_multiprocess())


def make_accelerator(cfg: RunOptions) -> Accelerator:
    """The run's accelerator; `grad_accum` micro-batches make one optimiser step where the command has it.
    FSDP or DeepSpeed asked for on a machine without GPUs is refused: accelerate would quietly run DDP."""
    if cpu_multiprocess():
        asked = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(var, "").lower() in ("1", "true", "yes")]
        if asked:
            raise RunError(f"{asked[0]} was asked for (accelerate launch --use_{asked[0].lower()}), but there is no "
                           "GPU: accelerate would run plain DDP instead. Launch with --multi_gpu for DDP on CPUs")
    use_bf16, why = bf16_choice(cfg.bf16)
    mixed_precision = "bf16" if use_bf16 else "no"
    log.info("precision: %s (%s)", "bf16 autocast, float32 weights and optimiser" if use_bf16 else "float32", why)
    _allow_precision_change(mixed_precision)
    accelerator = Accelerator(
        cpu=cpu_multiprocess(),
        mixed_precision=mixed_precision,
        log_with=list(getattr(cfg, "log_with", [])) or None,  # commands with a Tracking section
        project_dir=str(cfg.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=getattr(cfg, "grad_accum", 1)),
    )
    set_seed(cfg.seed, device_specific=False)
    return accelerator


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix units (AMX, AVX-512 BF16, Arm BF16), or None. Read from torch's own
    CPU capability report: what its kernels can use, the OS's permission for AMX tiles included."""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    found = [name for name in ("amx_bf16", "avx512_bf16") if capability.get(name)]
    if not found and capability.get("architecture", "") in ("aarch64", "arm64"):
        found = ["bf16"] if "bf16" in _cpu_flags() else []
    return " and ".join(found) or None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {word for line in text.splitlines() if line.lower().startswith(("flags", "features"))
            for word in line.split(":", 1)[1].split()}


def bf16_choice(setting: str) -> tuple[bool, str]:
    """(bf16 on?, why) for `--bf16 auto|yes|no`: auto is on for CUDA and for CPUs whose matrix units
    run bf16 natively (there a bf16 matmul is several times a float32 one); elsewhere bf16 is emulated
    and slower, so auto stays float32."""
    if setting != "auto":
        return setting == "yes", f"--bf16 {setting}"
    if torch.cuda.is_available():
        return True, "--bf16 auto: CUDA"
    units = cpu_bf16_units()
    if units:
        return True, f"--bf16 auto: the CPU has bf16 matrix units ({units})"
    return False, "--bf16 auto: no CUDA, and the CPU has no bf16 matrix units"


def _allow_precision_change(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision ("restart your runtime"): a process that runs several commands (a notebook, a
    pipeline, the tests) could then never switch bf16. Only the precision part is dropped; the
    process group (PartialState) stays. DeepSpeed sets its precision itself and is left alone."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) \
            and state.get("distributed_type") != DistributedType.DEEPSPEED:
        AcceleratorState._reset_state(reset_partial_state=False)


def load_examples_for(path: str | None, cfg: DataOptions, role: str, *,
                      require_cot: bool | None = None, report_skipped: bool = True) -> list[Example]:
    """The examples of `path`. require_cot: every row must have a reference CoT; None means the
    train role needs one and the eval role does not (eval data needs a question and a gold answer).
    report_skipped: log the rows skip_invalid dropped (off for reftkit.preflight's reading ahead)."""
    from reftkit.data.readers import load_examples

    if path is None:
        raise ValueError(f"no {role} data: set {role}_file in the config or on the command line")
    require_cot = role == "train" if require_cot is None else require_cot
    result = load_examples(path, cfg.data_format, skip_invalid=cfg.skip_invalid, require_cot=require_cot)
    if result.skipped and report_skipped:
        log.warning(result.summary())
    return result.examples


def training_examples(train: list[Example] | None, cfg, *, require_cot: bool = True) -> list[Example]:
    """The examples a trainer was given, or its train_file; the first max_train_examples of them.
    require_cot=False for trainers that use only the questions and gold answers (ReFT, the reranker)."""
    train = train if train is not None else load_examples_for(cfg.train_file, cfg, "train", require_cot=require_cot)
    return train[: cfg.max_train_examples]


def load_model_and_tokenizer(name_or_path: str, train: list[Example], seed: int,
                             cot: CotStyle = "natural") -> tuple[PreTrainedModel, object]:
    """`tiny` builds a tokenizer on the training text and a small Llama; anything else is from_pretrained."""
    if name_or_path == "tiny":
        tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
        return build_model(tokenizer, seed=seed), tokenizer
    return load_causal_lm(name_or_path), load_tokenizer(name_or_path)


def prepare_lm_for_training(lm: PreTrainedModel, cfg: TrainerOptions) -> PreTrainedModel:
    """Gradient checkpointing and/or LoRA adapters, as configured. Checkpointing is switched on
    first, on the plain model, so peft sees it and keeps the (frozen) embedding output differentiable."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if cfg.lora_r:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    return lm


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own RNG. Without it each new iterator draws from the global torch RNG, which
    also drives sampling, so a resumed run (new iterator after the RNG restore) would sample
    differently from an uninterrupted one."""
    return torch.Generator().manual_seed(seed)


def make_optimizer(params, cfg: TrainerOptions, total_steps: int):
    """AdamW with linear warm-up, then linear decay to 0 or a constant rate.

    `params` is an iterable of tensors or of param-group dicts (a group may set its own "lr")."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        groups = [{"params": [p for p in params if p.requires_grad]}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=_fused_adamw(groups) or None)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if cfg.lr_schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    return optimizer, scheduler


def _fused_adamw(groups: list[dict]) -> bool:
    """Whether AdamW's fused kernel serves these parameters: one pass per tensor instead of one per
    operation (several times faster a step for SmolLM2-135M on a 2-core CPU), the same update. Only
    on CPU and CUDA (the parameters move there later, in accelerator.prepare: not where an MPS or XPU
    device would take them) and with a torch whose CPU kernel exists (2.4+)."""
    if torch.backends.mps.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    tensors = [p for g in groups for p in g["params"]]
    if not all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in tensors):
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):  # a torch without the CPU kernel refuses at construction
        return False
    return True


def epoch_batches(accelerator: Accelerator, loader, progress, epoch: int):
    """(index, batch) pairs of one epoch; on the epoch a resumed run stopped in, the batches it
    already consumed are skipped (the seedable sampler gives the same order again)."""
    loader.set_epoch(epoch)
    skip = progress.batch_in_epoch if epoch == progress.epoch else 0
    return enumerate(accelerator.skip_first_batches(loader, skip) if skip else loader, start=skip)


class Metrics:
    """Appends one strict-JSON line per record to metrics.jsonl (a non-finite number is written as
    null); forwards to TensorBoard/W&B if configured. A resumed run first drops the rows logged
    after its checkpoint, so no step appears twice."""

    def __init__(self, accelerator: Accelerator, cfg: RunOptions, run_name: str, resumed_at: int | None = None):
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is not None and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _row_step(line) <= resumed_at]
                self.path.write_text("".join(line + "\n" for line in kept))
        if cfg.log_with:
            accelerator.init_trackers(run_name, config=json.loads(cfg.model_dump_json()))

    def log(self, record: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        row = {"step": step, "time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and a pipeline
        # (the demo: SFT then ReFT in one process) still needs it.
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped with the rows after it
        return math.inf


def guarded_step(accelerator: Accelerator, model, optimizer, cfg: TrainerOptions, loss: torch.Tensor,
                 where: str) -> tuple[bool, float | None]:
    """Clips the gradients and takes the optimiser step unless the loss (on any process) or the
    gradient norm is non-finite: then the run stops (cfg.nonfinite "stop", nothing is saved) or the
    step is skipped ("skip"). Returns (stepped, gradient norm). `where` names the step in messages."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=accelerator.device)
    bad = accelerator.reduce(bad, "sum").item() > 0
    norm = float(grad_norm) if grad_norm is not None else None  # DeepSpeed clips inside its own step
    if bad or (norm is not None and not math.isfinite(norm)):
        what = f"non-finite {'loss' if bad else 'gradient norm'} at {where}"
        if cfg.nonfinite == "stop":
            raise NonFiniteError(f"{what}: run stopped, nothing of this step saved; the last checkpoint is intact "
                                 "(lower lr, or rerun with --nonfinite skip to skip such steps)")
        log.warning("%s: step skipped (nonfinite: skip)", what)
        optimizer.zero_grad()
        return False, norm
    optimizer.step()
    optimizer.zero_grad()
    return True, norm
