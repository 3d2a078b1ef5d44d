"""`ScoreArguments.amp_dtype` autocasts the evaluation forwards; SGLD gradients and moments stay in fp32/fp64."""

import numpy as np
import torch
from conftest import fit, make_mlp, make_regression
from kronfluence import ScoreArguments

from kronfluence_bif import Analyzer, BIFArguments, RegressionTask, prepare_model


def test_bf16_autocast_scores_track_fp32(tmp_path):
    train, query = make_regression(64, seed=0), make_regression(6, seed=1)
    task = RegressionTask()
    model = prepare_model(fit(make_mlp(width=32), train, steps=300), task)
    args = BIFArguments(num_chains=2, num_draws=150, num_burnin_steps=20, sampler_batch_size=16)
    analyzer = Analyzer(
        "amp", model, task, cpu=True, output_dir=str(tmp_path), disable_tqdm=True, strategy="bif", bif_args=args
    )
    analyzer.fit_all_factors("f", dataset=train)
    kw = dict(query_dataset=query, train_dataset=train, per_device_query_batch_size=6)
    analyzer.compute_pairwise_scores("fp32", "f", **kw)
    analyzer.compute_pairwise_scores("bf16", "f", score_args=ScoreArguments(amp_dtype=torch.bfloat16), **kw)
    a = analyzer.load_pairwise_scores("fp32")["all_modules"].flatten().numpy()
    b = analyzer.load_pairwise_scores("bf16")["all_modules"].flatten().numpy()
    assert analyzer.load_score_args("bf16").amp_dtype == "torch.bfloat16"
    assert np.isfinite(b).all()
    # the same chains, only the evaluation is rounded: the scores must stay strongly correlated
    assert np.corrcoef(a, b)[0, 1] > 0.8, np.corrcoef(a, b)[0, 1]
