"""Reusable config pieces: the base config, model sizes, optimizer presets, mesh presets."""
