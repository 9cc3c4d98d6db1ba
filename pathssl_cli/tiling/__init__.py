"""Whole-slide tiling (`pathssl tile`): slide reading, tissue detection, the tiler and the tile store.

Nothing here imports torch, so tiling runs on machines without it.
"""
