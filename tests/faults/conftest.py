"""The fault suite runs ``archer fit`` through ``tests/distributed/harness.py``; the runs import this
folder's ``fault_probe`` (test callbacks): in-process through ``sys.path``, in child processes through
``PYTHONPATH`` (``fault_probe.CHILD_ENV``)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))  # harness
sys.path.insert(0, str(HERE))
