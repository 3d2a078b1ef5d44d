"""The one-flag swap on a plain kronfluence Task, runnable as is (README, "The one-flag swap").

python examples/quickstart.py
"""

import time

import torch
import torch.nn.functional as F
from kronfluence.task import Task

from kronfluence_bif import Analyzer, prepare_model
from kronfluence_bif.demo.uci import load_concrete, train_mlp


class UCITask(Task):  # your unchanged kronfluence Task (this one is kronfluence's UCI example)
    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        outputs = model(inputs)
        if sample:
            targets = torch.normal(outputs.detach(), std=1.0)
        return F.mse_loss(outputs, targets, reduction="sum")  # kronfluence sums over the batch

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


start = time.perf_counter()
train, q = load_concrete()  # UCI concrete, shipped: 927 training rows, 103 query rows
task = UCITask()
model = prepare_model(train_mlp(train), task)  # prepare_model is kronfluence's
analyzer = Analyzer("run", model, task, strategy="bif")  # strategy="ekfac" behaves exactly like kronfluence
analyzer.fit_all_factors("f", dataset=train)  # bif: cheap, records its arguments only
analyzer.compute_pairwise_scores("s", "f", query_dataset=q, train_dataset=train, per_device_query_batch_size=8)
scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [n_query, n_train], float32
print(f"BIF scores {list(scores.shape)} in ./influence_results/run/scores_s/ after {time.perf_counter() - start:.0f} s")
print("Most helpful training rows for query 0:", scores[0].topk(3).indices.tolist())
