"""Per-token influence on a tiny character-level GPT-2 trained on Python's own help texts (no downloads).

    python -m kronfluence_bif.demo.tiny_lm                  # train 1073 steps on 1 thread (cached), then score
    python -m kronfluence_bif.demo.tiny_lm --steps 300      # fewer training steps

The corpus is CPython's `pydoc_data.topics` (the texts behind `help("for")`), split into paragraphs; a few
paragraphs are held out for the prompt/completion queries. A 2-layer GPT-2 (`GPT2Config` + `GPT2LMHeadModel`)
is trained on random 64-character windows of the rest, and its weights are cached in the output directory.
Influence is then computed for fixed-length training paragraphs against the queries' completions (labels -100
on the prompt, the paper's sec. 4.3 measurement), with one kronfluence-bif `Analyzer`:

- EK-FAC per-token scores (`ScoreArguments(compute_per_token_scores=True)`): ``[n_query, n_train, T]``, the
  influence of each training token on the whole completion. GPT-2's `Conv1D` layers are swapped for equivalent
  `nn.Linear` (`conv1d_to_linear`) so kronfluence tracks them.
- BIF per-token scores from one SGLD phase: the same kronfluence file, plus the token-by-token matrix
  ``[n_query, T_query, n_train, T_train]`` in `bif_token_scores.safetensors` (paper sec. 3.2, App. B.4).

It renders a heatmap of query tokens x training tokens for the top training sequences (paper Fig. 2), an HTML
page with tokens coloured by influence (Fig. 16-19), prints the top token pairs and how often they are the same
character, and the wall time and peak memory of each method.

Alignment: the Task's per-token values (and BIF's token scores) sit at the position of the token being
predicted. kronfluence's per-token score at position t comes from the activations of input token t, whose direct
effect is the prediction of token t + 1; `shift_to_targets` moves such scores to the predicted token.

The package, in the order data flows: `corpus` (tokenizer, corpus split, datasets), `model` (the GPT-2 and its
Conv1D -> Linear swap), `train` (training and the weight cache), `influence` (the EK-FAC and BIF runs),
`analysis` (score arrays: alignment, top pairs, relations), `render` (heatmaps, HTML), `script` (the command line
behind `__main__`). Every name is importable from `kronfluence_bif.demo.tiny_lm` itself.
"""

from kronfluence_bif.demo.tiny_lm.analysis import (
    context_snippet,
    format_pairs,
    per_token_agreement,
    relation_matrices,
    relation_rates,
    shift_to_targets,
    top_token_pairs,
    top_train_sequences,
)
from kronfluence_bif.demo.tiny_lm.corpus import (
    PAD_TOKEN,
    UNK_TOKEN,
    CharTokenizer,
    CorpusSplit,
    TokenDataset,
    choose_scored,
    display_token,
    encode_fixed,
    load_corpus,
    make_dataset,
    make_queries,
    make_train_dataset,
    split_corpus,
    split_paragraphs,
)
from kronfluence_bif.demo.tiny_lm.influence import (
    DEFAULT_BIF_ARGS,
    run_bif_per_token,
    run_ekfac_per_token,
    score_inputs,
)
from kronfluence_bif.demo.tiny_lm.model import (
    conv1d_to_linear,
    linear_module_names,
    make_model,
)
from kronfluence_bif.demo.tiny_lm.render import (
    HTML_HEAD,
    mixing_warning,
    plot_token_heatmaps,
    render_all,
    render_influence_html,
)
from kronfluence_bif.demo.tiny_lm.script import (
    main,
    parse_args,
    report_token_pairs,
    score_and_render,
)
from kronfluence_bif.demo.tiny_lm.train import (
    CONFIG_FILE,
    DEFAULT_TRAIN_STEPS,
    MODEL_FILE,
    TRAINING_FILE,
    VOCAB_FILE,
    TrainingStats,
    heldout_loss,
    load_or_train,
    train_lm,
    training_recipe,
)
from kronfluence_bif.usage import Usage, measure

__all__ = [
    "CONFIG_FILE",
    "CharTokenizer",
    "CorpusSplit",
    "DEFAULT_BIF_ARGS",
    "DEFAULT_TRAIN_STEPS",
    "HTML_HEAD",
    "MODEL_FILE",
    "PAD_TOKEN",
    "TRAINING_FILE",
    "TokenDataset",
    "TrainingStats",
    "UNK_TOKEN",
    "Usage",
    "VOCAB_FILE",
    "choose_scored",
    "context_snippet",
    "conv1d_to_linear",
    "display_token",
    "encode_fixed",
    "format_pairs",
    "heldout_loss",
    "linear_module_names",
    "load_corpus",
    "load_or_train",
    "main",
    "make_dataset",
    "make_model",
    "make_queries",
    "make_train_dataset",
    "measure",
    "mixing_warning",
    "parse_args",
    "per_token_agreement",
    "plot_token_heatmaps",
    "relation_matrices",
    "relation_rates",
    "render_all",
    "render_influence_html",
    "report_token_pairs",
    "run_bif_per_token",
    "run_ekfac_per_token",
    "score_and_render",
    "score_inputs",
    "shift_to_targets",
    "split_corpus",
    "split_paragraphs",
    "top_token_pairs",
    "top_train_sequences",
    "train_lm",
    "training_recipe",
]
