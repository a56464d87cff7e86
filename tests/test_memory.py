"""Monte Carlo scoring streams in batches: a million samples cost no more than ten thousand."""

import subprocess
import sys
import textwrap

from conftest import gma

MEASURE = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    import gan_mc_anomaly as gma

    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    generator = gma.build_generator(8, (16,))
    discriminator = gma.build_discriminator((16,))
    count = int(sys.argv[1])
    gma.monte_carlo_sample(generator, discriminator, 10_000, 10_000, 8, seed=0)  # warm up
    before = peak_mib()
    logits, _ = gma.monte_carlo_sample(generator, discriminator, count, 10_000, 8, seed=1)
    assert len(logits) == count
    print(peak_mib() - before)
""")


def peak_growth_mib(count, tmp_path):
    script = tmp_path / "measure.py"
    repo = str(__import__("os").path.dirname(gma.__file__))
    script.write_text(MEASURE.format(repo=repo))
    result = subprocess.run([sys.executable, str(script), str(count)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.strip().splitlines()[-1])


def test_scoring_a_million_samples_does_not_hold_their_images(tmp_path):
    growth = peak_growth_mib(1_000_000, tmp_path)
    # The million images would take 3,000 MiB; the logits kept take 8 MiB.
    assert growth < 100
