import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from make_fixtures import fixture_files  # noqa: E402,F401  (the data-format fixtures, as a pytest fixture)
