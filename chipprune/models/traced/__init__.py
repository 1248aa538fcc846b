"""Any CNN a user brings: `torchvision:<builder>` or `<module>:<callable>`, traced with torch.fx
and described automatically (`TracedNet`)."""

from .factory import ArchError, is_external
from .graph import TraceError
from .net import TracedNet

__all__ = ["ArchError", "TraceError", "TracedNet", "is_external"]
