"""Chroma (Chroma1-HD, Chroma1-Base): adapter.py (the family), kohya.py (kohya sd-scripts layout), tiny.py
(tiny model), planning.py (memory planner)."""
