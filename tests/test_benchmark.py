"""The one-class benchmark: a short real run on two digits with tiny settings."""

import json
import os
import sys

import pytest

from conftest import TINY_FLAGS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import one_class  # noqa: E402


def test_short_benchmark_writes_a_table_with_every_digit_and_score(tmp_path, mnist_npz):
    flags = [flag for flag in TINY_FLAGS]
    flags[flags.index("--normal-digits"):flags.index("--normal-digits") + 3] = []
    output = tmp_path / "bench"
    assert one_class.main(["--data-path", mnist_npz, "--digits", "2", "7", "--output",
                           str(output)] + flags) == 0

    with open(output / "one_class.json") as file:
        table = json.load(file)
    assert list(table["digits"]) == ["2", "7"]
    for row in table["digits"].values():
        assert set(row) == {"nearest_generated", "discriminator", "nearest_training"}
        for name, values in row.items():
            assert 0.0 <= values["auroc"] <= 1.0
            assert 0.0 <= values["validation_false_alarm"] <= 1.0
            assert 0.0 <= values["validation_detection"] <= 1.0
            if name != "nearest_training":  # the baseline has no generated images
                assert 0.0 <= values["monte_carlo_false_alarm"] <= 1.0
    # The baseline needs no GAN; on real digits it ranks far better than chance.
    assert all(row["nearest_training"]["auroc"] > 0.7 for row in table["digits"].values())

    markdown = (output / "one_class.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 3 + 3  # header, 2 digits x 3 scores, 3 means
    mean_auroc = sum(row["discriminator"]["auroc"] for row in table["digits"].values()) / 2
    assert f"| **mean** | discriminator | {mean_auroc:.3f} |" in markdown


def test_benchmark_refuses_runs_without_held_out_images(tmp_path, mnist_npz):
    with pytest.raises(SystemExit):
        one_class.main(["--data-path", mnist_npz, "--output", str(tmp_path),
                        "--validation-fraction", "0", "--classify-with", "monte_carlo"])
