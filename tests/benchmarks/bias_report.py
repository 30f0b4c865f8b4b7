"""What the bias report costs: reports.write_bias_report on a train sample of the scan's bound
(100,000 rows) and 10,000 test predictions, random labels and facets, for a number of facet values.

    .venv/bin/python tests/benchmarks/bias_report.py [VALUES ...]   (default: 3 and 43)
"""

import sys
import tempfile
import time

import numpy as np
from review_trainer.insights import reports
from review_trainer.data.scan import SAMPLE_ROWS
from review_trainer.contract.hyperparameters import Hyperparameters

TEST_ROWS = 10_000


def measure(values):
    rng = np.random.default_rng(0)
    categories = [f"Category{i}" for i in range(values)]
    train = [(int(label), categories[code]) for label, code in
             zip(rng.integers(0, 5, SAMPLE_ROWS), rng.integers(0, values, SAMPLE_ROWS))]
    labels = rng.integers(0, 5, TEST_ROWS).astype(np.int32)
    codes = rng.integers(0, values, TEST_ROWS).astype(np.int32)
    predicted = rng.integers(0, 5, TEST_ROWS)
    hp = Hyperparameters.from_dict({"bias_facet": "product_category"})
    with tempfile.TemporaryDirectory() as out_dir:
        started = time.perf_counter()
        reports.write_bias_report(hp, train, (lambda: (labels, [(codes, categories)]), labels, predicted), out_dir,
                                   lambda line: None)
        return time.perf_counter() - started


if __name__ == "__main__":
    for values in [int(v) for v in sys.argv[1:]] or [3, 43]:
        print(f"bias report: {values} facet values, {SAMPLE_ROWS} train sample rows, {TEST_ROWS} test rows: "
              f"{measure(values):.1f} s")
