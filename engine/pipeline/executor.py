"""Pipeline parallelism on Ray: ``pipeline_parallel_size`` stages of ``tensor_parallel_size`` actors.

Start-up, placement, health and teardown are the RayExecutor's (one actor per rank, one bundle
each; PAGED_ENGINE_RAY_PLACEMENT_STRATEGY=STRICT_SPREAD puts every rank on its own node). A step is
one chain of actor calls submitted at once: every rank of stage s gets the step's SchedulerOutput
(``ray.put`` once) and the ObjectRef of stage s-1's result; Ray runs stage s when that object
exists and moves it between nodes through its object store. Only the last stage's answer is
waited for (with the RayExecutor's failure handling over every rank's call).

One step is in flight at a time: the scheduler needs a step's sampled tokens before it schedules
the next, so while stage 1 works stage 0 waits (the bubble; ``stage_timing`` measures it). Keeping
every stage busy needs several independently scheduled batches (vLLM's virtual engines), which this
engine does not have yet.
"""
from __future__ import annotations

from engine.config import EngineConfig
from engine.executor.ray_executor import RayExecutor
from engine.errors import EngineDeadError
from engine.executor.ray_utils import step_timeout_s
from engine.pipeline.worker import check_pipeline_config
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput


class PipelineRayExecutor(RayExecutor):
    def __init__(self, config: EngineConfig) -> None:
        check_pipeline_config(config)  # before any actor starts
        self.pp_size = config.parallel.pipeline_parallel_size
        super().__init__(config)

    def stage_actors(self, stage: int) -> list:
        tp = self.tp_size
        return self.actors[stage * tp:(stage + 1) * tp]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        so_ref = self.ray.put(scheduler_output)
        # earlier stages return two objects: what the next stage reads (never fetched here) and a
        # None that is, so every rank's call is watched for failure without moving hidden states
        waits, prev = [], None
        for stage in range(self.pp_size - 1):
            pairs = [a.execute_method.options(num_returns=2).remote("execute_stage_split", so_ref, prev)
                     for a in self.stage_actors(stage)]
            waits += [done for _, done in pairs]
            prev = pairs[0][0]  # the stage's tensor rank 0 returns what the next stage needs
        last = [a.execute_method.remote("execute_stage", so_ref, prev) for a in self.stage_actors(self.pp_size - 1)]
        ranks = list(range(self.world_size))
        return self._gather(waits + last, step_timeout_s(), "execute_model", ranks=ranks)[-self.tp_size]

    def stage_timing(self) -> list[tuple[int, float, int]]:
        """Per rank: (stage, seconds computing steps, steps)."""
        return self.collective_rpc("stage_timing")
