"""Next-token accuracy as a local `evaluate` module (loaded by path, no Hub access)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fraction of positions where the model's most likely next token equals the
actual next token. Predictions are per-position argmax ids at position t (which predict
token t+1); references are the input ids. Positions whose reference is -100 are ignored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: sequences of predicted token ids (argmax of the logits), one per input.
    references: the input token ids, same shape as predictions.
Returns:
    next_token_accuracy: float in [0, 1].
    tokens: number of scored positions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NextTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        correct, total = 0, 0
        for pred, ref in zip(predictions, references):
            pred = np.asarray(pred)[:-1]
            ref = np.asarray(ref)[1:]
            mask = ref != -100
            correct += int((pred[mask] == ref[mask]).sum())
            total += int(mask.sum())
        return {"next_token_accuracy": correct / max(total, 1), "tokens": total}
