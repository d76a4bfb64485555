"""One run on several processes: DDP through accelerate / torch.distributed, never our own.

    accelerate launch -m studio.train RUN.yaml             # every visible GPU of this PC
    accelerate launch -m studio.train --resume RUN_DIR     # resume, the same way
    accelerate launch --multi_gpu --num_processes 2 -m studio.train RUN.yaml   # 2 CPU processes
                                                            # (gloo) on a PC without a GPU

Each process (rank) runs the same pipe as a one-process run (`studio.train.jobs.execute_run`:
prepare's tokens -> `recipe.build` -> the loop), with these differences, which all live here
or are switched on from here:

- Rank 0 alone prepares the run (checks, PII gate, the run folder) and hands the prepared
  run to the others (`share`), so every rank trains in the same folder on the same rows.
- Rank 0 alone writes the run folder: log.jsonl, metadata, chat template, token cache,
  adapter, model card (prepare and the loop ask `is_main`); the Trainer itself saves
  checkpoints from rank 0 only (each rank adds its own RNG state).
- Each rank trains on its own card: `gpu_index = LOCAL_RANK`, so a QLoRA base is loaded
  with `device_map={"": local_rank}` by the one loader.
- Stop: the job (or Ctrl-C) asks for it with a stop file in the run folder; the ranks agree
  by an all-reduce of the flag after every step (`stop_callback`), so all of them stop at
  the same step and save one checkpoint and one adapter. A rank that stopped alone would
  leave the others waiting in the next all-reduce forever.
- Effective batch = batch x accumulation x processes, recorded in the run's metadata.

The process count and backend come from the launcher's environment (RANK, LOCAL_RANK,
WORLD_SIZE); nccl on GPUs, gloo on CPU (accelerate's PartialState chooses). This module is
a leaf of the train package (prepare, the recipe, the loop and the job ask it about ranks); the
command that runs a launched run, rank by rank, is `studio.train.cli`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from studio import compat

STOP_FILE = "STOP"  # created in a run folder to stop a multi-process run at the next step
FSDP_CONFIG = "accelerate_fsdp.yaml"  # written next to every multi-process run
CPU_PROCESSES_ENV = "LORA_STUDIO_CPU_PROCESSES"  # tests: N CPU processes instead of N GPUs


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones (1 process when not launched)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Read from the launcher's environment (torchrun / accelerate launch set these)."""
    env = os.environ
    return World(
        int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    )


def launched() -> bool:
    """Started by `accelerate launch` / torchrun with more than one process."""
    return world().size > 1


def is_main() -> bool:
    """True for rank 0 and for every one-process run: the process that writes the run folder."""
    return world().main


def effective_batch(batch_size: int, grad_accum: int, processes: int) -> int:
    """Rows per optimizer step: each process takes its own batch, then gradients are averaged."""
    return batch_size * grad_accum * processes


# --- the process group ------------------------------------------------------------------------


# How long the other ranks wait for rank 0 to prepare the run (read and tokenize the data),
# and the app for its first line. NCCL's own default (10 min) was shorter than the app's wait;
# the base model is fetched before the launch (`fetch_base_before_launch`), so this covers
# preparation only.
PREPARE_WAIT_S = 30 * 60


def init_group(cpu: bool) -> str:
    """Join the launched processes (accelerate's PartialState); returns the backend's name.

    The Trainer later builds its own state on the same group (PartialState is shared)."""
    from datetime import timedelta

    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(cpu=cpu, timeout=timedelta(seconds=PREPARE_WAIT_S))
    return str(dist.get_backend())


def fetch_base_before_launch(base_model: str) -> None:
    """Download (or convert) the base model in the app, before any rank starts: under the
    launch, rank 0 did it while the other ranks waited in the process group, and a large
    download outlasted both their timeout and the app's. A model that cannot be fetched is
    refused here, before processes start."""
    from studio.config import ConfigError
    from studio.models.loader import resolve_model

    try:
        resolve_model(base_model)
    except Exception as exc:
        raise ConfigError("base_model", f"could not fetch {base_model!r}: {exc}") from exc


def share(obj: Any) -> Any:
    """Rank 0's `obj`, on every rank (pickled through the process group)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- the stop file and the agreement to stop ------------------------------------------------


def request_stop(run_dir: str | Path) -> Path:
    """Ask a multi-process run to stop at its next step (what the Train tab's Stop does)."""
    path = Path(run_dir) / STOP_FILE
    path.write_text("stop\n", encoding="utf-8")
    return path


def clear_stop(run_dir: str | Path) -> None:
    """Remove a stop request, so that a resumed run does not stop at once."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


def stop_callback(run_dir: Path, request: threading.Event, agreed: threading.Event) -> Any:
    """A TrainerCallback that sets `agreed` on every rank, at the same step, when any rank was
    asked to stop (its `request` event, or the stop file that rank 0 sees).

    `agreed` is the stop event the loop's progress callback honours, so every rank turns it
    into `should_training_stop` (with a checkpoint) at the same next step."""
    from transformers import TrainerCallback

    class AgreeToStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            asked = request.is_set() or (is_main() and (run_dir / STOP_FILE).exists())
            device = "cpu"
            if dist.get_backend() == "nccl":
                device = f"cuda:{torch.cuda.current_device()}"
            flag = torch.tensor([int(asked)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()):
                agreed.set()
            return control

    return AgreeToStop()


# --- a rank's failure, told to the job that launched the ranks --------------------------------

FAILED_MARK = "LORA_STUDIO_RANK_FAILED "  # a rank's failure, one JSON line on its stdout


def failure_line(rank: int, result: Any) -> str:
    """The line a failed rank prints (every rank, rank 0 too): its error, advice and retry
    config as the loop explained them (`loop._explain_failure`, the one-process rule), and when
    it broke. Ranks > 0 write nothing in the run folder, so this is how their error reaches
    the job; the time tells the rank that broke first from those that broke because of it."""
    import json

    return FAILED_MARK + json.dumps(
        {
            "rank": rank,
            "time": result.failed_at or 0.0,
            "message": result.message,
            "advice": result.advice,
            "retry_config": result.retry_config,
        }
    )


def first_failure(lines: list[str]) -> dict[str, Any] | None:
    """The failure that came first among the ranks' FAILED_MARK lines, or None.

    When rank 1 breaks (out of memory, say), rank 0 then fails in its next all-reduce with a
    lost connection: the earliest failure is the cause, the later ones are its echoes."""
    import json

    found = []
    for line in lines:
        at = line.find(FAILED_MARK)  # not always at the start: ranks share one pipe, and
        if at < 0:  # rank 0's progress bar leaves its line open
            continue
        try:
            entry = json.loads(line[at + len(FAILED_MARK) :])
            found.append((float(entry["time"]), int(entry["rank"]), entry))
        except (ValueError, KeyError, TypeError):
            continue
    return min(found, key=lambda f: f[:2])[2] if found else None


# --- a run on several processes -------------------------------------------------------------


def record(prepared: Any, w: World, backend: str) -> None:
    """The run's metadata says how it ran: processes, backend and the effective batch."""
    cfg = prepared.cfg
    prepared.meta["distributed"] = {
        "launcher": "accelerate",
        "processes": w.size,
        "backend": backend,
        "per_device_batch": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "effective_batch": effective_batch(cfg.batch_size, cfg.grad_accum, w.size),
        "fsdp_config": FSDP_CONFIG,
    }
    prepared.meta["effective_batch"] = prepared.meta["distributed"]["effective_batch"]


def for_this_rank(prepared: Any, w: World) -> Any:
    """Rank 0's prepared run, placed on this rank's own card (QLoRA: device_map {"": rank})."""
    if prepared.device == "cuda":
        prepared = replace(prepared, cfg=prepared.cfg.replace(gpu_index=w.local_rank))
    return prepared


def wants_cpu(config: str | None, resume: str | None) -> bool:
    """gloo on CPU: no GPU visible, or the run is set to train on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return True
    from studio import runs
    from studio.config import RunConfig

    try:
        path = Path(resume) / runs.RUN_YAML if resume else Path(config or "")
        return RunConfig.load(path).device == "cpu"
    except Exception:
        return False


# --- launching (the Train tab's "Use all N GPUs") -------------------------------------------


def cpu_processes() -> int:
    """LORA_STUDIO_CPU_PROCESSES=N: offer an N-process CPU run (tests, a PC without a GPU)."""
    try:
        return max(0, int(os.environ.get(CPU_PROCESSES_ENV, "0")))
    except ValueError:
        return 0


def free_port() -> int:
    """A free TCP port for the processes' rendezvous (29500, the default, may be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(train_args: list[str], processes: int) -> list[str]:
    """`accelerate launch` for `python -m studio.train ARGS` on `processes` processes.

    `--multi_gpu` starts the processes through torchrun; on a PC without a GPU they train on
    the CPU with gloo (`accelerate launch --cpu` alone would start only one process)."""
    if processes > 1 and not cpu_processes() and not compat.nccl_available():
        raise RuntimeError(
            f"training on {processes} GPUs needs NCCL, which torch has on Linux only: on"
            " Windows, run the studio inside WSL 2 to use several GPUs, or train on one"
        )
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "studio.train", *train_args,
    ]  # fmt: skip


# --- FSDP, for models too large for one card ------------------------------------------------


def fsdp_config_text(base_model: str, processes: int) -> str:
    """An `accelerate launch --config_file` YAML that shards the model over the GPUs (FSDP2)."""
    return f"""\
# FSDP: shard the model's weights, gradients and optimizer state over the GPUs.
# Use it when the base model's 16-bit weights do not fit on ONE of your cards (DDP, the
# default of `accelerate launch`, keeps a full copy of the model on every card): e.g. a
# 14B model (~28 GB in bf16) on two 24 GB cards. If QLoRA (4-bit) fits one card, prefer
# plain DDP: it is simpler and faster. FSDP here is for LoRA (16-bit base); it was written
# for {base_model} and {processes} processes and is not run by the studio's tests (no GPUs).
#
#   accelerate launch --config_file {FSDP_CONFIG} -m studio.train run.yaml
#
# Check the layer class name below against your model (LlamaDecoderLayer, Qwen2DecoderLayer,
# Gemma2DecoderLayer...): `python -c "import transformers; print(transformers.AutoConfig.
# from_pretrained('MODEL').architectures)"` names the model; its decoder layer is beside it.
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
machine_rank: 0
num_processes: {processes}
rdzv_backend: static
same_network: true
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_activation_checkpointing: false
"""


def write_fsdp_config(run_dir: Path, base_model: str, processes: int) -> Path:
    """Write the FSDP config next to the run (rank 0), for the day the model outgrows a card."""
    from studio import runs

    return runs.atomic_write_text(
        Path(run_dir) / FSDP_CONFIG, fsdp_config_text(base_model, processes)
    )


def offered_processes() -> int:
    """N of the Train tab's "Use all N GPUs" (offered when N >= 2): the GPUs a run would see,
    or LORA_STUDIO_CPU_PROCESSES. Asks the driver, not torch (the page is built without it).
    1 where torch has no NCCL (Windows): the GPUs could not train together there."""
    forced = cpu_processes()
    if forced:
        return forced
    if not compat.nccl_available():
        return 1
    from studio.hardware.detect import visible_gpu_count

    return visible_gpu_count()


def offer_label(processes: int) -> str:
    if cpu_processes():
        return f"Use {processes} CPU processes (DDP test mode, {CPU_PROCESSES_ENV})"
    return f"Use all {processes} GPUs"
