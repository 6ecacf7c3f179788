"""meganeura: an e-graph-optimizing tensor compiler that runs LLMs on any GPU."""
from .graph import Graph, ShapeError
from .model import Model, load_model
from .program import Program, compile
from .weights import Checkpoint, CheckpointError, open_weights

__all__ = ["Graph", "ShapeError", "Program", "compile", "Checkpoint", "CheckpointError", "open_weights",
           "Model", "load_model"]
__version__ = "0.1.0"
