"""``WeightSyncCallback``: copy the actor's parameters into the rollout engine after each training step.

When. Archer's module runs ``ppo_epochs`` × mini-batches of optimizer steps inside one
``training_step`` (manual optimization) and draws the next rollouts at the start of the next
``training_step``. So syncing once in ``on_train_batch_end`` is "after every optimizer step" as
far as rollouts are concerned: the engine never samples with weights older than the latest step,
and the intermediate mini-batch states, which no rollout would see, are not copied.

What. ``pl_module.actor``'s parameters under their Hugging Face names, tied ones under every name
(``lm_head.weight`` too), FSDP2 shards all-gathered one parameter at a time
(:func:`archer.rollout.named_full_tensors`), pushed with ``pl_module.rollout.load_weights``. A LoRA
actor pushes its merged weights, ``W + s·B·A`` under the base model's names
(:func:`archer.lora.merged_named_tensors`): the engine serves a plain model. The
copy time is logged as ``time/weight_sync_s``. An :class:`~archer.rollout.HFEngine` samples with
the actor itself, so nothing is copied.

Checks. The copy is the watchdog's ``weight sync`` phase (``model.watchdog.weight_sync_s`` bounds it,
the NCCL transfer included, which has no timeout of its own). Each ``load_weights`` makes the
engine's weights the next version; the next step checks that its samples carry it and that the
engine's log-probs agree with the trainer's (:mod:`archer.weight_check`).

Ranks. Our setup builds one engine per rank (each rank samples its own share of prompts), so
each rank pushes to its own engine; the all-gathers inside ``full_tensor()`` are collectives, so
every rank iterates the parameters in the same order anyway. With tensor parallelism
(``VLLMEngine(tensor_parallel_size>1)``, vLLM's ``external_launcher``), each rank is one TP worker
of a shared engine: each still passes the full tensors, and vLLM's weight loaders keep only that
rank's shard — the gathered tensor is transient, so the resident copy is one shard per rank. An
engine shared by several training ranks through its own worker processes (not what Archer builds)
would need only one rank per engine to push; the others would still take part in the gathers.
"""

from __future__ import annotations

import time

import lightning as L

from archer import watchdog
from archer.lora import engine_tensors
from archer.rollout import HFEngine

__all__ = ["WeightSyncCallback"]


class WeightSyncCallback(L.Callback):
    """After every training batch, copy ``pl_module.actor``'s weights into ``pl_module.rollout`` in place."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        engine = getattr(pl_module, "rollout", None)
        actor = getattr(pl_module, "actor", None)
        if engine is None or actor is None:
            raise AttributeError(
                f"WeightSyncCallback needs pl_module.actor and pl_module.rollout; {type(pl_module).__name__} "
                f"has actor={actor is not None}, rollout={engine is not None}"
            )
        if isinstance(engine, HFEngine):
            return
        start = time.perf_counter()
        with watchdog.phase("weight sync", getattr(engine, "endpoint", None)):
            engine.load_weights(engine_tensors(actor))
            if trainer.world_size > 1:
                # Servers shared by the ranks are updated by one of them: no rank samples the next batch
                # before the new weights are in place.
                trainer.strategy.barrier("archer-weight-sync")
        seconds = time.perf_counter() - start
        if hasattr(pl_module, "log_step_metric"):  # ArcherModule: in the step's one row (archer/step_logging.py)
            pl_module.log_step_metric("time/weight_sync_s", seconds)
        else:  # another LightningModule holding an actor and an engine (the tests' one-step modules)
            pl_module.log("time/weight_sync_s", seconds, on_step=True, on_epoch=False)
