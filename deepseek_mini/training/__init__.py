"""Lightning + Hydra training stack: LitDeepSeek, callbacks, and the train()/evaluate() tasks."""

from .module import LitDeepSeek

__all__ = ["LitDeepSeek"]
