"""The run's accelerator and its precision: one process or several (`accelerate launch`), bf16
where the hardware runs it natively, float32 elsewhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin, set_seed

from reftkit.config import RunOptions
from reftkit.training.errors import RunError

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
