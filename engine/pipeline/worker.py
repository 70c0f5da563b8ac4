"""A worker of a pipeline stage: rank r of ``tensor x pipeline`` is tensor rank ``r % tp`` of stage
``r // tp``. With TP > 1 all ranks join one process group (for the rendezvous) and each stage's
ranks all-reduce within their own subgroup; stages never run collectives with each other (hidden
states travel through Ray, engine/pipeline/executor.py)."""
from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.distributed.parallel_state import create_store, init_distributed, set_tp_group
from engine.errors import UnsupportedModelError
from engine.pipeline.partition import stage_layer_range
from engine.pipeline.stage_model import Intermediate
from engine.pipeline.stage_runner import PipelineStageRunner
from engine.scheduler.output import SchedulerOutput
from engine.worker.cpu_runtime import configure_cpu_runtime
from engine.worker.model_runner import ModelRunnerOutput
from engine.worker.worker import Worker


def check_pipeline_config(config: EngineConfig) -> None:
    """Start-up errors (in the driver, before any actor starts) for what stages cannot run."""
    pp = config.parallel.pipeline_parallel_size
    stage_layer_range(config.model.num_layers, pp, 0)  # divisibility
    for what, on in (("speculative decoding", config.speculative_config is not None),
                     ("LoRA adapters", config.lora_config is not None),
                     ("a pooling (embedding) runner", config.runner == "pooling")):
        if on:
            raise UnsupportedModelError(f"{what} does not run with pipeline_parallel_size={pp} yet; "
                                        "use tensor parallelism (or pipeline_parallel_size=1) for it")


class PipelineWorker(Worker):
    def __init__(self, config: EngineConfig, rank: int = 0, distributed_init_method: str | None = None) -> None:
        super().__init__(config, rank, distributed_init_method)
        par = config.parallel
        self.world_size = par.world_size
        self.tp_rank, self.pp_rank = rank % par.tensor_parallel_size, rank // par.tensor_parallel_size
        self.rng = stage_layer_range(config.model.num_layers, par.pipeline_parallel_size, self.pp_rank)

    def prepare_rendezvous(self) -> str:
        if self.tp_size == 1:  # stages alone never meet in a process group: no store, nothing listening
            return self.distributed_init_method
        self._store = create_store(self.distributed_init_method, self.rank, self.world_size)
        if isinstance(self._store, torch.distributed.TCPStore):
            host = self.distributed_init_method[len("tcp://"):].rpartition(":")[0]
            return f"tcp://{host}:{self._store.port}"
        return self.distributed_init_method

    def init_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            configure_cpu_runtime()
        tp = self.tp_size
        if tp > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            store = getattr(self, "_store", None) or create_store(self.distributed_init_method, self.rank, self.world_size)
            init_distributed(store, self.rank, self.world_size, backend)
            groups = [torch.distributed.new_group(list(range(s * tp, (s + 1) * tp)))  # every rank makes every group
                      for s in range(self.world_size // tp)]
            set_tp_group(self.tp_rank, tp, groups[self.pp_rank])
        else:
            set_tp_group(0, 1)
        torch.manual_seed(self.config.seed)
        self.runner = PipelineStageRunner(self.config, self.device, self.rng)

    def load_model(self, show_progress: bool = True) -> None:
        self.runner.load_model(show_progress=show_progress and self.rank == 0)

    def execute_stage(self, so: SchedulerOutput, received: Intermediate | None) -> Intermediate | ModelRunnerOutput | None:
        out = self.runner.execute_stage(so, received)
        return out if self.tp_rank == 0 else None

    def execute_stage_split(self, so: SchedulerOutput, received: Intermediate | None) -> tuple[Intermediate | None, None]:
        """An earlier stage's step as two Ray return values: (for the next stage, a done marker)."""
        return self.execute_stage(so, received), None

    def stage_timing(self) -> tuple[int, float, int]:
        """(stage, seconds spent computing steps, steps) since start-up: the bubble measure."""
        return self.pp_rank, self.runner.busy_s, self.runner.num_steps
