"""The hooked looped transformer (`looped`), its components, hook containers and hook names.

Modules here are imported by path (`loop_lens.model.looped`, ...): the package itself imports
nothing, so the cache can use the hook names and containers without importing the model, and
the model can build caches without an import cycle.
"""
