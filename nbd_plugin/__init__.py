"""The nbdkit Python plugin: `plugin.py` is the file nbdkit loads; `server.py` does the work."""

from pathlib import Path

PLUGIN_PATH = Path(__file__).with_name("plugin.py")
