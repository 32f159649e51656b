"""Family modules: one file per looped family whose layers or loop are not plain config switches.

Each module provides the family's weight modules (taking hook containers, `NO_HOOKS`-compatible)
and a `Family` class (build / embed / begin / step / gate / state / readout) that the one-loop
core runs (`/work/notes/family-interface.md`, issue 21).
"""
