"""Write the example notebooks (examples/*.ipynb) from the cell sources below.

    python examples/build_notebooks.py

The notebooks are committed without outputs; tests/test_notebooks.py executes every one.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_quickstart": [
        ("md", "# Quickstart: every iteration of a looped model, hooked\n\n"
               "`zoo:khop-huginn` is a tiny Huginn-style model `(1, 2 x T, 1)` trained in the package on a "
               "k-hop pointer task (`loop_lens.zoo.task`). Iterations count from 0."),
        ("code", "import torch\nimport loop_lens as ll\n\nmodel = ll.load('zoo:khop-huginn')\nprint(model.cfg.layout, ll.zoo.card('khop-huginn')['description'])"),
        ("md", "A prompt lists ten `source target` pointers, then questions `| x k =`: where do you land after k hops from x?"),
        ("code", "from loop_lens.zoo.task import sample, ANSWER_FROM\nbatch = sample(4, [2], torch.Generator().manual_seed(0), split='heldout')\nprint(batch.text(0))\nprint(model.to_str_tokens(batch.tokens[0])[:8])"),
        ("code", "logits, cache = model.run_with_cache(batch.tokens, n_loops=8, seed=0)\n"
                 "pred = logits[:, ANSWER_FROM].argmax(-1)\nprint('accuracy', (pred == batch.answers).float().mean().item())\n"
                 "print(cache['iter.3.blocks.1.attn.hook_pattern'].shape)   # [batch, head, query, key] at iteration 3\n"
                 "print(cache.stack('hook_resid_post').shape)                # [n_loops, n_block, batch, pos, d_model]"),
        ("md", "Hook names carry the iteration; `ll.hook_name` builds them."),
        ("code", "print(ll.hook_name('pattern', layer=1, iteration=3))\nprint(model.loop_hook_names(0)[:6])"),
        ("md", "Test-time compute: accuracy on the first question as the number of loops grows, for 2 hops "
               "(trained; the model was trained on 1 and 2) and 3 hops (never trained on). `answers_after(tokens, j)` "
               "is the letter j hops from the start: on 3-hop questions the model lands on the 2-hop letter."),
        ("code", "from loop_lens.zoo.task import answers_after\n"
                 "for k in (2, 3):\n    hard = sample(256, [k], torch.Generator().manual_seed(1), split='heldout')\n"
                 "    for T in (1, 2, 4, 8):\n        p = model(hard.tokens, n_loops=T, seed=0)[:, ANSWER_FROM[0]].argmax(-1)\n"
                 "        hit = {j: round((p == answers_after(hard.tokens, j)[:, 0]).float().mean().item(), 3) for j in (1, 2, 3)}\n"
                 "        print(f'k={k} T={T}  lands on the letter j hops away, j=1,2,3:', hit)"),
        ("md", "TransformerLens's own cache helpers work on the unrolled view."),
        ("code", "accum, labels = cache.unrolled().accumulated_resid(return_labels=True)\nprint(accum.shape, labels[:4], labels[-1])"),
    ],
    "02_fixed_points": [
        ("md", "# Fixed points: does each block layer settle, and where?"),
        ("code", "import torch\nimport loop_lens as ll\nfrom loop_lens import analysis as A\nfrom loop_lens.zoo.task import sample\n\n"
                 "model = ll.load('zoo:khop-huginn')\nbatch = sample(8, [1, 2], torch.Generator().manual_seed(0), split='heldout')\n"
                 "_, cache = model.run_with_cache(batch.tokens, n_loops=64, seed=0, names_filter=lambda n: n.endswith('hook_resid_post'))"),
        ("code", "steps = A.step_sizes(cache)\nprint('convergence iteration per layer (tol 1e-3):', steps.convergence_iteration(1e-3).max(1).values.tolist())\nsteps.plot(by='layer')"),
        ("code", "fp = A.fixed_points(cache)\nprint('min cos between layer fixed points:', round(fp.min_layer_cosine, 4), 'degenerate:', fp.degenerate())\nfp.plot_layer_cosine()"),
        ("code", "A.cyclic_similarity(cache).plot()"),
        ("code", "classes = A.classify_tokens(cache)\nclasses.counts()"),
        ("code", "A.pca_trajectory(cache, position=-2).plot(dims=2)"),
        ("md", "The paper's random-init experiment (section 4.2) in small: norm styles x injection."),
        ("code", "sweep = A.random_init_sweep(seeds=(0,), n_loops=64, progress=False)\nsweep.summary()"),
    ],
    "03_head_stability": [
        ("md", "# Which attention heads stop changing, and when?"),
        ("code", "import torch\nimport loop_lens as ll\nfrom loop_lens import analysis as A\nfrom loop_lens.zoo.task import sample\n\n"
                 "model = ll.load('zoo:khop-huginn')\nbatch = sample(8, [2], torch.Generator().manual_seed(0), split='heldout')\n"
                 "_, cache = model.run_with_cache(batch.tokens, n_loops=24, seed=0)"),
        ("code", "stab = A.attention_stability(model, cache, batch.tokens)\nstab.table(tol=1e-2).sort_values('stabilisation_iteration')"),
        ("code", "stab.plot('change_frobenius')"),
        ("code", "print('sink rate per (iteration, layer):')\nstab.sink_rate()[:6]"),
        ("md", "Attention of every head, with a slider over iterations (renders offline: circuitsvis's bundle is inlined)."),
        ("code", "ll.viz.attention(cache, model.to_str_tokens(batch.tokens[0]))"),
        ("md", "The same numbers without a cache: streaming keeps only the previous iteration."),
        ("code", "streamed = A.streaming.stream_analyses(model, batch.tokens, n_loops=24, seed=0)\n"
                 "torch.allclose(streamed.attention.concentration, stab.concentration)"),
    ],
    "04_stages_vs_feedforward": [
        ("md", "# Stages of inference against a feedforward baseline\n\n`zoo:khop-ouro` `(0, 2 x 4, 0)` and `zoo:khop-ff` (8 layers) were trained on the same task."),
        ("code", "import torch\nimport loop_lens as ll\nfrom loop_lens import analysis as A\nfrom loop_lens.zoo.task import sample, ANSWER_FROM\n\n"
                 "looped, ff = ll.load('zoo:khop-ouro'), ll.load('zoo:khop-ff')\nbatch = sample(16, [2], torch.Generator().manual_seed(0), split='heldout')\n"
                 "_, c_loop = looped.run_with_cache(batch.tokens)\n_, c_ff = ff.run_with_cache(batch.tokens)"),
        ("code", "profile = A.depth_profile(c_loop, baseline_cache=c_ff)\nprofile.plot('concentration')"),
        ("code", "profile.plot('resid_norm')"),
        ("md", "Logit lens at the first answer position: where does the answer appear?"),
        ("code", "lens = A.logit_lens(looped, c_loop)\npos = ANSWER_FROM[0]\nprint(lens.entry_point(k=1)[:4, pos].tolist())\nlens.grid(position=pos)"),
        ("code", "ll.viz.logit_lens_grid(lens, position=pos)"),
        ("md", "Ouro's exit gate: the exit distribution over iterations at the answer positions."),
        ("code", "gates = c_loop.stack('hook_exit_logit')\np = looped.exit_distribution(gates)[:, :, ANSWER_FROM]\np.mean((1, 2))"),
    ],
    "05_load_checkpoints": [
        ("md", "# Loading Ouro / Huginn checkpoints from a local directory\n\n"
               "`ll.load(dir)` reads `config.json` and the weights (safetensors first, `pytorch_model.bin` with "
               "`weights_only=True` otherwise) and never runs the checkpoint's code. Here we write a tiny random checkpoint "
               "in Huginn's key layout ourselves, so the notebook needs no download."),
        ("code", "import json, tempfile, torch\nfrom pathlib import Path\nfrom safetensors.torch import save_file\nimport loop_lens as ll\n\n"
                 "D, H, I, V = 64, 4, 96, 128\ng = torch.Generator().manual_seed(0)\ndef r(*shape):\n    return torch.randn(*shape, generator=g) * 0.05\n\n\n"
                 "def block(prefix):\n    return {prefix + 'norm_1.weight': torch.ones(D), prefix + 'norm_2.weight': torch.ones(D), prefix + 'norm_3.weight': torch.ones(D),\n"
                 "            prefix + 'norm_4.weight': torch.ones(D), prefix + 'attn.Wqkv.weight': r(3 * D, D), prefix + 'attn.proj.weight': r(D, D),\n"
                 "            prefix + 'mlp.fc.weight': r(2 * I, D), prefix + 'mlp.proj.weight': r(D, I)}\n"
                 "tensors = {'transformer.wte.weight': r(V, D), 'transformer.ln_f.weight': torch.ones(D), 'transformer.adapter.weight': r(D, 2 * D)}\n"
                 "for name in ['prelude.0.', 'core_block.0.', 'core_block.1.', 'coda.0.']:\n    tensors.update(block('transformer.' + name))\n"
                 "config = {'model_type': 'huginn_raven', 'n_embd': D, 'n_heads': H, 'intermediate_size': I, 'vocab_size': V, 'padded_vocab_size': V,\n"
                 "          'n_layers_in_prelude': 1, 'n_layers_in_recurrent_block': 2, 'n_layers_in_coda': 1, 'mean_recurrence': 8, 'norm_eps': 1e-6,\n"
                 "          'rope_base': 50000.0, 'qk_bias': False, 'tie_embeddings': True, 'injection_type': 'linear',\n"
                 "          'init_values': {'std': 0.079, 'embed_scale': 8.0}}\n"
                 "ckpt = Path(tempfile.mkdtemp())\nsave_file(tensors, str(ckpt / 'model.safetensors'))\n(ckpt / 'config.json').write_text(json.dumps(config))"),
        ("code", "model = ll.load(ckpt)                  # family detected: huginn (norm_3/norm_4 keys)\nprint(model.cfg.family, model.cfg.layout)"),
        ("md", "The initial state is random (truncated normal): pass `seed=` or an explicit `initial_state=`; the one used is at `iter.0.hook_state_pre`."),
        ("code", "tokens = torch.randint(0, V, (1, 10), generator=g)\n_, cache = model.run_with_cache(tokens, n_loops=32, seed=7)\n"
                 "s0 = cache['iter.0.hook_state_pre']\ntorch.allclose(model(tokens, n_loops=32, initial_state=s0), model(tokens, n_loops=32, seed=7))"),
        ("md", "Logit lens and coda lens per iteration (Lu et al. 2025):"),
        ("code", "from loop_lens.analysis import coda_lens, logit_lens_of_states\nprint(logit_lens_of_states(model, cache).shape, coda_lens(model, cache).shape)"),
        ("md", "Converting to loop_lens's native format (also `loop-lens convert SRC DST`):"),
        ("code", "out = model.save(Path(tempfile.mkdtemp()) / 'native')\nsorted(p.name for p in out.iterdir())"),
    ],
}


def build() -> list[Path]:
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in cells]
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding changes only what was edited
        path = HERE / f"{name}.ipynb"
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print(f"wrote {p}")
