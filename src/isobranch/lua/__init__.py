"""Sandboxed Lua 5.4 runtime used by isobranch nodes."""
