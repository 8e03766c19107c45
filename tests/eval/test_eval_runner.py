"""``archer eval`` internals: records with line-separator characters, chunk seeds, reward settings
that have no ``__dict__``, refused k, sharded checkpoint folders, reward errors in the results,
samples that are the training engine's, a checkpoint saved again, no worker left behind."""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from archer.data.datamodule import render_prompt
from archer.eval import EvalConfig, evaluate
from archer.eval.model import model_label, prepare_model
from archer.eval.records import SampleRecord, append_records, load_records
from archer.eval.runner import _describe, chunk_seed
from archer.rollout import HFEngine, SamplingConfig


def test_records_keep_unicode_line_separators_inside_responses(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 unescaped; str.splitlines
    # splits on them, which tore such a record in two on resume.
    records = [SampleRecord("toy", 0, j, f"a{sep}b", None, 0.0, 3, False) for j, sep in
               enumerate(["\u2028", "\u2029", "\x85", "\r"])]
    path = tmp_path / "samples.jsonl"
    append_records(path, records)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, the case that broke
    assert load_records(path) == records
    # a torn last line is still cut off, and the complete ones kept
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(records[0]), ensure_ascii=False)[:20])
    assert load_records(path) == records
    assert path.read_bytes().endswith(b"\n")


def test_chunk_seeds_are_hashed_and_stable():
    # The old `seed * 1_000_003 + crc32(name) + 7919 * chunk` gave these two the same seed.
    assert chunk_seed(7919, "aime", 0) != chunk_seed(0, "aime", 1_000_003)
    seeds = {chunk_seed(seed, name, chunk) for seed in range(3) for name in ("a", "b") for chunk in range(50)}
    assert len(seeds) == 3 * 2 * 50 and all(0 <= s < 2**31 for s in seeds)
    # A resumed eval is another process: its chunks must get the same seeds, so no per-process
    # ``hash(str)``. Pinned (the value every process and version must give; a changed scheme is
    # caught at resume by eval_config.json's seed-scheme field).
    assert chunk_seed(5, "aime", 7) == 171107322


class _Slotted:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1


class _Reward:
    def __init__(self) -> None:
        self.pattern = re.compile(r"\d+")  # no __dict__
        self.path = Path("/tmp/x")  # slots
        self.slotted = _Slotted()
        self.tags = {"b", "a"}
        self.me = self  # a cycle


def test_describe_falls_back_for_objects_without_attributes_and_cycles():
    described = _describe(_Reward())
    json.dumps(described)  # JSON-able
    assert described == _describe(_Reward())  # equal across instances: a resume compares it
    args = described["init_args"]
    assert args["pattern"]["repr"] == "re.compile('\\\\d+')"
    assert args["slotted"] == {"class_path": f"{__name__}._Slotted", "repr": f"<{__name__}._Slotted object>"}
    assert args["tags"] == ["a", "b"]
    assert args["me"] == {"class_path": f"{__name__}._Reward", "cycle": True}


def test_model_label_names_the_run_of_a_checkpoint():
    assert model_label("runs/archer_math_1.5b/checkpoints/last.ckpt") == "archer_math_1.5b/last.ckpt"
    assert model_label("checkpoints/DeepSeek-R1-Distill-Qwen-1.5B") == "DeepSeek-R1-Distill-Qwen-1.5B"
    assert model_label("/") == "/"  # no name: the path itself, not an empty cell


@pytest.mark.parametrize(("k", "message"), [([], "k is empty"), ([1, 5], r"every k must lie in \[1, n=4\]"),
                                            ([0], r"every k must lie in \[1, n=4\]")])
def test_bad_k_is_refused_before_anything_runs(tmp_path, k, message):
    config = EvalConfig(model=str(tmp_path / "no-model"), data={}, out=str(tmp_path / "out"), n=4, k=k)
    with pytest.raises(ValueError, match=message):
        evaluate(config)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_folder_is_consolidated_and_exported(tmp_path, tiny_model_dir, save_like_model_parallel):
    actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.01)  # "trained": differs from the folder it started from
    state = {f"actor.{k}": v for k, v in actor.state_dict().items()}
    state.update({f"reference.{k}": torch.zeros_like(v) for k, v in actor.state_dict().items()})
    ckpt = tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt"
    save_like_model_parallel(state, {"hyper_parameters": {"model_path": tiny_model_dir}, "global_step": 3}, ckpt)
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()

    out = tmp_path / "out"
    out.mkdir()
    model_dir = prepare_model(str(ckpt), out)
    assert model_dir == out / "model"
    exported = AutoModelForCausalLM.from_pretrained(model_dir)
    for name, value in actor.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # nothing consolidated left on disk

    (ckpt / "meta.pt").unlink()
    with pytest.raises(FileNotFoundError, match="without Lightning's meta.pt"):
        prepare_model(str(ckpt), tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="nor a sharded"):
        prepare_model(str(tmp_path), tmp_path / "out3")


class FlakyReward:
    """Scores 1 for responses of even length; raises on odd lengths that are 1 mod 4, returns a
    string on those 3 mod 4; its extract_answer raises on lengths divisible by 3."""

    def __call__(self, response: str, row: dict) -> float:
        if len(response) % 4 == 1:
            raise RuntimeError("boom")
        if len(response) % 4 == 3:
            return "yes"  # type: ignore[return-value]
        return 1.0

    def extract_answer(self, response: str, row: dict) -> str | None:
        if len(response) % 3 == 0:
            raise KeyError("no answer field")
        return str(len(response) % 2)


def test_reward_errors_are_counted_and_maj_at_k_omission_stated(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = EvalConfig(model=tiny_model_dir, data={"m": str(data), "c": str(data)}, domains={"c": "code"},
                        out=str(tmp_path / "out"), n=4, k=[1, 4], engine="hf", max_new_tokens=9, reward=FlakyReward(),
                        reward_workers=1, chunk_size=2, num_bootstrap=10)
    results = evaluate(config)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_bytes().split(b"\n")[:-1]]
    for name in ("m", "c"):
        responses = [s["response"] for s in samples if s["dataset"] == name]
        assert results[name]["reward_errors"] == sum(len(r) % 2 == 1 for r in responses) > 0
        assert results[name]["reward_timeouts"] == 0
        assert all(s["score"] == 0.0 for s in samples if s["dataset"] == name and len(s["response"]) % 2)
    # extract_answer runs on math data sets only; its failures cast no vote instead of ending the eval
    math_responses = [s for s in samples if s["dataset"] == "m"]
    assert results["m"]["extract_errors"] == sum(len(s["response"]) % 3 == 0 for s in math_responses) > 0
    assert all(s["answer"] is None for s in math_responses if len(s["response"]) % 3 == 0)
    assert "extract_errors" not in results["c"]
    assert "maj@k" in results["m"] and "maj@k_omitted" not in results["m"]
    assert "maj@k" not in results["c"] and "no answer to vote on" in results["c"]["maj@k_omitted"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["c"]["reward_errors"] == results["c"]["reward_errors"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"m {results['m']['reward_errors']} errors / 0 timeouts" in table
    assert "maj@k not reported for: c (code data set" in table


ROWS = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)]


@pytest.fixture
def toy_data(tmp_path) -> Path:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return data


def _config(model, data: dict, out: Path) -> EvalConfig:
    return EvalConfig(model=str(model), data={name: str(file) for name, file in data.items()}, out=str(out), n=2,
                      k=[1], engine="hf", max_new_tokens=8, chunk_size=2, reward_workers=1, num_bootstrap=10)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_bytes().split(b"\n")[:-1]]


def test_samples_are_the_training_engines_completions_with_chunk_seeds(tmp_path, tiny_model_dir, toy_data):
    evaluate(_config(tiny_model_dir, {"toy": toy_data}, tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = HFEngine()
    engine.setup(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, tiny_model_dir)
    prompts = [render_prompt(row["prompt"], tokenizer, apply_chat_template=True, system_prompt=None)[1] for row in ROWS]
    expected = []
    for chunk, start in enumerate(range(0, len(ROWS), 2)):  # the paper's math sampling, one seed per chunk
        sampling = SamplingConfig(n=2, temperature=0.6, top_p=0.95, max_new_tokens=8, seed=chunk_seed(0, "toy", chunk))
        expected += [c for group in engine.generate(prompts[start : start + 2], sampling) for c in group]
    samples = _samples(tmp_path / "out")
    assert [s["response"] for s in samples] == tokenizer.batch_decode([c.token_ids for c in expected],
                                                                      skip_special_tokens=True)
    assert [(s["length"], s["truncated"]) for s in samples] == [(len(c.token_ids), c.finish_reason == "length")
                                                                 for c in expected]


def _save_checkpoint(path: Path, model_dir: str, seed: int) -> None:
    """A single-file checkpoint of the module's layout: the tiny model's weights, perturbed by ``seed``."""
    actor = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    state = {f"actor.{k}": v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in actor.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": {"model_path": model_dir}}, path)


def test_a_checkpoint_saved_again_is_exported_again_and_sampled_afresh(tmp_path, tiny_model_dir, toy_data, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    _save_checkpoint(ckpt, tiny_model_dir, seed=0)
    evaluate(_config(ckpt, {"toy": toy_data}, out))
    first = (out / "samples.jsonl").read_text()
    capsys.readouterr()
    evaluate(_config(ckpt, {"toy": toy_data}, out))  # unchanged: the export and the samples are reused
    assert "chunk" not in capsys.readouterr().err
    assert (out / "samples.jsonl").read_text() == first

    _save_checkpoint(ckpt, tiny_model_dir, seed=1)  # training went on and saved last.ckpt again
    evaluate(_config(ckpt, {"toy": toy_data}, out))
    notices = [line for line in capsys.readouterr().err.splitlines() if "exporting it again" in line]
    assert notices == [f"[archer eval] {ckpt} is not the checkpoint {out / 'model'} was exported from (its files' "
                       f"sizes or modification times changed): exporting it again; the samples and results of the "
                       f"old one in {out} are removed"]
    evaluate(_config(ckpt, {"toy": toy_data}, tmp_path / "fresh"))
    assert (out / "samples.jsonl").read_text() == (tmp_path / "fresh" / "samples.jsonl").read_text() != first
    assert (out / "results.json").read_text() == (tmp_path / "fresh" / "results.json").read_text()
    # an OUT of another checkpoint is refused before anything in it is replaced
    other = tmp_path / "other.ckpt"
    shutil.copy(ckpt, other)
    with pytest.raises(ValueError, match=r"differs in: \['model'\]"):
        evaluate(_config(other, {"toy": toy_data}, out))
    assert (out / "samples.jsonl").read_text() == (tmp_path / "fresh" / "samples.jsonl").read_text()


def _workers() -> set[int]:
    return {process.pid for process in multiprocessing.active_children()}


def test_no_reward_worker_is_left_when_the_engine_fails_to_build(tmp_path, tiny_model_dir, toy_data):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # the tokenizer still loads
    before = _workers()
    config = _config(broken, {"toy": toy_data}, tmp_path / "out")
    config.reward_workers = 2
    with pytest.raises(Exception, match="(?i)safetensors|header"):
        evaluate(config)
    assert _workers() <= before


def test_data_sets_sharing_a_reward_leave_no_worker_behind(tmp_path, tiny_model_dir, toy_data):
    before = _workers()
    evaluate(_config(tiny_model_dir, {"a": toy_data, "b": toy_data}, tmp_path / "out"))  # both MathReward()
    assert _workers() <= before
