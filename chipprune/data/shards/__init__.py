"""Large image sets as tar shards of encoded images with a byte-range index: written by the
prepare stage (writer), read with random access by any process (reader), decoded and cropped
per image (transforms). See layout.py for the files."""

from .layout import index_path, load_index, shard_name
from .reader import ShardedSplit
from .writer import Source, WrittenSplit, write_split

__all__ = ["ShardedSplit", "Source", "WrittenSplit", "index_path", "load_index", "shard_name",
           "write_split"]
