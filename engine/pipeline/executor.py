"""Pipeline parallelism on Ray: ``pipeline_parallel_size`` stages of ``tensor_parallel_size`` actors.

Start-up, placement, health and teardown are the RayExecutor's (one actor per rank, one bundle
each; PAGED_ENGINE_RAY_PLACEMENT_STRATEGY=STRICT_SPREAD puts every rank on its own node). A step is
one chain of actor calls submitted at once: every rank of stage s gets the step's SchedulerOutput
(``ray.put`` once) and the ObjectRef of stage s-1's result; Ray runs stage s when that object
exists and moves it between nodes through its object store. Only the last stage's answer is
waited for (with the RayExecutor's failure handling over every rank's call).

The scheduler needs a step's sampled tokens before it schedules the next, so steps do not overlap;
a step's requests do: they are cut into micro-batches (``pipeline_micro_batches``, as many as
stages by default), each its own chain, so stage s computes group g while stage s + 1 computes
group g - 1 (engine/pipeline/micro_batch.py). ``stage_timing`` measures what is left of the bubble.
"""
from __future__ import annotations

from engine.config import EngineConfig
from engine.executor.ray_executor import RayExecutor
from engine.errors import EngineDeadError
from engine.executor.ray_utils import step_timeout_s
from engine.pipeline.micro_batch import merge_outputs, split_step
from engine.pipeline.worker import check_pipeline_config
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput


class PipelineRayExecutor(RayExecutor):
    def __init__(self, config: EngineConfig) -> None:
        check_pipeline_config(config)  # before any actor starts
        self.pp_size = config.parallel.pipeline_parallel_size
        self.num_micro_batches = config.parallel.pipeline_micro_batches or self.pp_size
        super().__init__(config)

    def stage_actors(self, stage: int) -> list:
        tp = self.tp_size
        return self.actors[stage * tp:(stage + 1) * tp]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        groups = split_step(scheduler_output, self.num_micro_batches)
        refs, ranks, last_of_group = [], [], []
        for group in groups:  # every chain submitted before any is waited for: the stages overlap
            group_refs = self._submit_chain(group)
            refs += group_refs
            ranks += list(range(self.world_size))
            last_of_group.append(len(refs) - self.tp_size)  # the last stage's tensor rank 0
        results = self._gather(refs, step_timeout_s(), "execute_model", ranks=ranks)
        return merge_outputs([results[i] for i in last_of_group])

    def _submit_chain(self, so: SchedulerOutput) -> list:
        """One group's calls through every stage, in rank order. Earlier stages return two objects:
        what the next stage reads (never fetched here) and a None that is, so every rank's call is
        watched for failure without moving hidden states."""
        so_ref = self.ray.put(so)
        waits, prev = [], None
        for stage in range(self.pp_size - 1):
            pairs = [a.execute_method.options(num_returns=2).remote("execute_stage_split", so_ref, prev)
                     for a in self.stage_actors(stage)]
            waits += [done for _, done in pairs]
            prev = pairs[0][0]  # the stage's tensor rank 0 returns what the next stage needs
        last = [a.execute_method.remote("execute_stage", so_ref, prev) for a in self.stage_actors(self.pp_size - 1)]
        return waits + last

    def stage_timing(self) -> list[tuple[int, float, int]]:
        """Per rank: (stage, seconds computing steps, steps)."""
        return self.collective_rpc("stage_timing")
