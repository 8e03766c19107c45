"""Lightning callbacks shipped with Archer (installed as ``archer.callbacks``)."""

from archer.callbacks.completion_logger import CompletionLogger
from archer.callbacks.progress import RLProgressBar
from archer.callbacks.token_view import TokenViewCallback
from archer.callbacks.weight_sync import WeightSyncCallback

__all__ = ["CompletionLogger", "RLProgressBar", "TokenViewCallback", "WeightSyncCallback"]
