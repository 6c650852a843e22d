"""The Redis Functions library, kew.lua, loaded by kew.functions."""
