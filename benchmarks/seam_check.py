"""The seam with Avalanche, checked as a user would: ``python -m benchmarks.seam_check``.

DKVB on the seeds' 2D stream (4 experiences x 2 classes) with a ReplayPlugin and with epoch-level
training metrics, once on the default fast path and once with ``fast_path="off"``; prints the accuracy
on the first experience after the whole stream, and the epoch accuracy / loss of the last epoch. Both
paths must print the same numbers.
"""

from __future__ import annotations

import warnings

import torch
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

from avalanche_dkvb import DKVB, create_dkvb_model
from avalanche_dkvb.data.toy2d import toy2d_benchmark, uniform_unit_square

EPOCH_ACC = "Top1_Acc_Epoch/train_phase/train_stream/Task000"
EPOCH_LOSS = "Loss_Epoch/train_phase/train_stream/Task000"


def run(fast_path: str, replay: bool) -> dict:
    torch.manual_seed(0)
    stream = toy2d_benchmark(seed=0)
    model = create_dkvb_model(2, 8, num_codebooks=20, num_keys=20, key_dim=2, value_init="normal",
                              generator=torch.Generator().manual_seed(0))
    evaluator = EvaluationPlugin(accuracy_metrics(epoch=True, experience=True), loss_metrics(epoch=True))
    strategy = DKVB(model=model, train_mb_size=32, train_epochs=20, lr=3.0, evaluator=evaluator,
                    init_data=uniform_unit_square(256, seed=1), key_init_kwargs={"epochs": 50, "batch_size": 64},
                    plugins=[ReplayPlugin(mem_size=40)] if replay else [], fast_path=fast_path)
    for experience in stream.train_stream:
        strategy.train(experience, shuffle=False)
    metrics = strategy.eval(stream.test_stream)
    return {"exp0_accuracy": metrics["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"],
            "last_epoch_accuracy": metrics.get(EPOCH_ACC), "last_epoch_loss": metrics.get(EPOCH_LOSS)}


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for replay in (False, True):
        for fast_path in ("compiled", "off"):
            result = run(fast_path, replay)
            print(f"replay={replay!s:5} fast_path={fast_path:8} " +
                  ", ".join(f"{k} {v:.4f}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
