"""The `dinomix` command line (`main.main`): one module per command, the shared job runner and options."""

from .main import main

__all__ = ["main"]
