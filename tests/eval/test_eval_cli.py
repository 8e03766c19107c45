"""``archer eval`` end to end on the tiny model: three files whose figures match the per-sample
records, exact resume after a kill, the config-file form, and the vLLM engine (one, or two
data-parallel processes)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from archer.cli import main
from archer.rewards import MathReward

FLAGS = ["--engine", "hf", "--max-new-tokens", "12", "--reward-workers", "1"]


@pytest.fixture(scope="module")
def bench(fixture_files, tmp_path_factory):
    """The fixtures converted as docs/reproduce.md does: a math set (R1 template) and a code set."""
    folder = tmp_path_factory.mktemp("bench")
    main(["data", "convert", str(fixture_files["deepscaler.json"]), str(folder / "math.jsonl"),
          "--prompt-key", "problem", "--prompt-template", "r1-math"])
    main(["data", "convert", str(fixture_files["lcb.jsonl"]), str(folder / "code.jsonl"),
          "--prompt-key", "question_content", "--tests-key", "public_test_cases,private_test_cases"])
    return {"math": folder / "math.jsonl", "code": folder / "code.jsonl"}


def _eval(model, data: dict, out: Path, *extra: str) -> None:
    argv = ["eval", str(model), "--out", str(out), *FLAGS, *extra]
    for name, file in data.items():
        argv += ["--data", f"{name}={file}"]
    main(argv)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "full"
    _eval(tiny_model_dir, bench, out, "--n", "4", "--k", "1", "2", "4", "--chunk-size", "2")
    return out


def test_writes_three_files_whose_figures_match_the_records(full_run, bench):
    results = json.loads((full_run / "results.json").read_text())
    samples = _samples(full_run)
    assert {(s["dataset"], s["problem"], s["sample"]) for s in samples} == (
        {("math", p, j) for p in range(4) for j in range(4)} | {("code", p, j) for p in range(2) for j in range(4)})
    for name in ("math", "code"):
        problems: dict[int, list[dict]] = {}
        for s in samples:
            if s["dataset"] == name:
                problems.setdefault(s["problem"], []).append(s)
        correct = [[s["score"] >= 1 for s in group] for group in problems.values()]
        # recomputed here from the records with the textbook formulas
        assert results[name]["avg@n"] == pytest.approx(sum(sum(c) / 4 for c in correct) / len(correct))
        for k in (1, 2, 4):
            by_hand = sum(1 - math.comb(4 - sum(c), k) / math.comb(4, k) for c in correct) / len(correct)
            assert results[name]["pass@k"][str(k)] == pytest.approx(by_hand)
        lengths = [s["length"] for s in samples if s["dataset"] == name]
        assert results[name]["mean_length"] == pytest.approx(sum(lengths) / len(lengths))
        truncated = [s["truncated"] for s in samples if s["dataset"] == name]
        assert results[name]["truncation_rate"] == pytest.approx(sum(truncated) / len(truncated))
    math_groups = [[s for s in samples if s["dataset"] == "math" and s["problem"] == p] for p in range(4)]
    maj4 = []
    for group in math_groups:  # k = n: one vote over all 4 samples
        votes = Counter(s["answer"] for s in group if s["answer"] is not None)
        top = max(votes.values(), default=0)
        winners = [a for a, count in votes.items() if count == top]
        right = {s["answer"] for s in group if s["score"] >= 1}
        maj4.append(sum(w in right for w in winners) / len(winners) if winners else 0.0)
    assert results["math"]["maj@k"]["4"] == pytest.approx(sum(maj4) / 4)
    assert "maj@k" not in results["code"]
    # the paper's sampling per domain
    assert (results["math"]["domain"], results["math"]["sampling"]["temperature"]) == ("math", 0.6)
    assert (results["code"]["domain"], results["code"]["sampling"]["temperature"]) == ("code", 0.8)
    assert results["math"]["sampling"]["top_p"] == 0.95
    # each record's answer and score are MathReward's on its response
    rows = [json.loads(line) for line in bench["math"].read_text().splitlines()]
    reward = MathReward()
    for s in samples:
        if s["dataset"] == "math":
            assert s["answer"] == reward.extract_answer(s["response"], rows[s["problem"]])
            assert s["score"] == reward(s["response"], rows[s["problem"]])
    assert any(s["answer"] is not None for s in samples if s["dataset"] == "math")
    table = (full_run / "results.md").read_text()
    assert "| model | math avg@4 | code avg@4 | math pass@4 | code pass@4 |" in table


def test_resume_after_a_torn_write_samples_only_what_is_missing(full_run, tiny_model_dir, bench, tmp_path, capsys):
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "eval_config.json").write_text((full_run / "eval_config.json").read_text())
    # the counts a killed run leaves (written before each chunk's records)
    (out / "reward_errors.json").write_text((full_run / "reward_errors.json").read_text())
    # the first math chunk (2 problems x 4 samples) complete, then 3 lines and a torn one of chunk 2
    lines = (full_run / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:11]) + lines[11][:25])
    capsys.readouterr()
    _eval(tiny_model_dir, bench, out, "--n", "4", "--k", "1", "2", "4", "--chunk-size", "2")
    progress = capsys.readouterr().err
    assert "math: chunk 1/2" not in progress  # kept
    assert "math: chunk 2/2 done" in progress and "code: chunk 1/1 done" in progress
    assert (out / "samples.jsonl").read_text() == (full_run / "samples.jsonl").read_text()
    assert (out / "results.json").read_text() == (full_run / "results.json").read_text()
    # a finished eval rerun samples nothing; asking for other k needs no new samples either
    _eval(tiny_model_dir, bench, out, "--n", "4", "--k", "1", "--chunk-size", "2")
    assert "chunk" not in capsys.readouterr().err
    assert set(json.loads((out / "results.json").read_text())["math"]["pass@k"]) == {"1"}
    with pytest.raises(SystemExit, match=r"differs in: \['datasets'\]"):  # one line
        _eval(tiny_model_dir, bench, out, "--n", "2", "--k", "1", "--chunk-size", "2")


def test_sigkilled_eval_resumes_to_the_uninterrupted_result(tiny_model_dir, bench, tmp_path):
    args = ["--data", f"math={bench['math']}", "--n", "4", "--k", "1", "4", "--chunk-size", "1",
            *FLAGS[:2], "--max-new-tokens", "32", "--reward-workers", "1"]
    main(["eval", tiny_model_dir, "--out", str(tmp_path / "reference"), *args])
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "archer.cli", "eval", tiny_model_dir, "--out", str(killed), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    samples = killed / "samples.jsonl"
    while process.poll() is None and not (samples.exists() and len(samples.read_text().splitlines()) >= 4):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert len(samples.read_text().splitlines()) < 16  # it died with problems left to sample
    assert not (killed / "results.json").exists()
    main(["eval", tiny_model_dir, "--out", str(killed), *args])
    assert samples.read_text() == (tmp_path / "reference" / "samples.jsonl").read_text()
    assert (killed / "results.json").read_text() == (tmp_path / "reference" / "results.json").read_text()


def test_config_file_form_with_a_routed_reward_and_flag_overrides(tiny_model_dir, bench, tmp_path):
    config = {
        "model": tiny_model_dir, "data": {"math": str(bench["math"])}, "out": str(tmp_path / "out"),
        "n": 4, "k": [1, 2], "engine": "hf", "max_new_tokens": 8, "reward_workers": 1,
        "reward": {"class_path": "archer.rewards.RoutedReward",
                   "init_args": {"routes": {"deep*": {"class_path": "archer.rewards.MathReward"}}}},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["eval", "--config", str(path), "--n", "2", "--temperature", "1.0"])  # flags override the file
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["math"]["n"] == 2 and results["math"]["sampling"]["temperature"] == 1.0
    assert "maj@k" in results["math"]  # RoutedReward passes MathReward's answer extraction through
    config["reward"]["init_args"]["routes"] = {"aime*": {"class_path": "archer.rewards.MathReward"}}
    config["out"] = str(tmp_path / "unknown")
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=r"no route for data_source \['deepscaler'\]"):  # one line
        main(["eval", "--config", str(path)])
    assert not (tmp_path / "unknown" / "samples.jsonl").exists()  # refused before sampling


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_eval_and_resume(tiny_model_dir, bench, tmp_path):
    pytest.importorskip("vllm")
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump({"vllm": {"max_model_len": 256, "kv_cache_memory_bytes": 64 << 20}}))
    args = ["eval", tiny_model_dir, "--config", str(config), "--data", f"math={bench['math']}", "--n", "4",
            "--k", "1", "4", "--chunk-size", "2", "--engine", "vllm", "--max-new-tokens", "12", "--reward-workers", "1"]
    main([*args, "--out", str(tmp_path / "a")])
    samples = _samples(tmp_path / "a")
    assert len(samples) == 16
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["math"]["avg@n"] == pytest.approx(sum(s["score"] >= 1 for s in samples) / 16)
    # resume from the first chunk: vLLM's per-request seeds make the rest come out the same
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "eval_config.json").write_text((tmp_path / "a" / "eval_config.json").read_text())
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b" / "samples.jsonl").write_text("".join(lines[:8]))
    main([*args, "--out", str(tmp_path / "b")])
    assert (tmp_path / "b" / "samples.jsonl").read_text() == (tmp_path / "a" / "samples.jsonl").read_text()
    # two engine processes, each with a part of every chunk: the samples of one engine
    main([*args, "--data-parallel-size", "2", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "samples.jsonl").read_text() == (tmp_path / "a" / "samples.jsonl").read_text()
    assert (tmp_path / "c" / "results.json").read_text() == (tmp_path / "a" / "results.json").read_text()
