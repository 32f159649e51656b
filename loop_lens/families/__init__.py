"""Family modules: one per looped-model family, each providing the parts of the one-loop core's
`Family` interface (build / embed / begin / step / gate / state / readout) that differ from the
plain single loop. See `docs/families/` for what each family computes."""
