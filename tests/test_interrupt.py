"""Ctrl-C (SIGINT to the terminal's process group: the trainer and its reward workers) ends ``archer fit``
and ``archer eval`` without a traceback from any process (issue 21, item 4). Real processes, real
signals: each command runs in its own session and gets SIGINT once it has done some work."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _interrupt(argv: list[str], cwd: Path, ready: str) -> tuple[int, str]:
    """Run ``archer ARGV``, send SIGINT to its process group after a stderr/stdout line containing
    ``ready``; its exit code and everything it wrote."""
    # SIGINT as a terminal leaves it: a runner started in the background by a non-interactive shell
    # (`nohup ... &`) passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler.
    process = subprocess.Popen([sys.executable, "-m", "archer.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if ready in line:
            os.killpg(process.pid, signal.SIGINT)
            break
    try:
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, "".join(seen) + rest


def test_ctrl_c_in_eval_is_one_line_and_says_how_to_resume(tmp_path, tiny_model_dir):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i} = ?", "answer": str(2 * i)}) + "\n" for i in range(40)))
    code, output = _interrupt(
        ["eval", tiny_model_dir, "--data", f"math={data}", "--n", "4", "--k", "1", "--out", str(tmp_path / "out"),
         "--engine", "hf", "--max-new-tokens", "8", "--chunk-size", "2", "--reward-workers", "2"],
        tmp_path, ready="chunk 1/20 done")
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert output.rstrip().endswith("archer eval: interrupted (run the same command again to resume)")


def test_ctrl_c_in_fit_stops_without_a_traceback(tmp_path, tiny_model_dir):
    code, output = _interrupt(
        ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--model.model_path={tiny_model_dir}",
         "--data.train_size=64", "--data.val_size=0", "--model.reward_workers=2"],
        tmp_path, ready="step 2/300")
    assert code != 0 and "Detected KeyboardInterrupt" in output, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt:" not in output, output[-3000:]
