"""How fast the script trains and samples, against the hardware and the usual way to write it.

In one process, on the script's default networks and batch size, it measures and prints:
- the float32 matrix-multiply rate of this machine (the yardstick for the rest);
- the rate that the training step's own matrix products reach alone, at its layer shapes
  (small products run slower than 2048 x 2048 ones: this is the step's ceiling);
- training steps per second of the script's compiled step (fit() over epochs of its tf.data
  pipeline), for a few steps-per-call and XLA choices, with tf.data's autotuning (which the
  script turns off), and on a GPU with the mixed precisions; and of the usual loop
  (generator.predict, then train_on_batch on the discriminator and on the stacked model),
  with their ratio;
- the training step's FLOP count and its share of the matrix-multiply rate;
- the rate that Monte Carlo scoring's own matrix products reach alone (its ceiling), and
  Monte Carlo images generated and scored per second at a few batch sizes, with their
  share of that rate;
- the share of a Monte Carlo batch's time spent drawing its latent vectors;
- images scored per second by the nearest_generated score (blur and blocked distances to
  the kept generated images), and the share of that rate its distance products reach;
- the peak memory of processes that score 10,000 and 1,000,000 Monte Carlo samples.

    python benchmarks/speed.py [--seconds 5] [--rounds 3] [--output benchmarks/results]

Every rate is measured in --rounds interleaved rounds, each share against its own round's
matmul rate, and reported as the median with the lowest and highest, because a shared
machine's speed drifts within a minute: one pass in a fixed order can rank the choices by
the drift. Training runs seeded and with TensorFlow's op determinism on, as in the script.

It needs no data: the training images are 6,000 random pixel images (about one digit's
share of MNIST), which cost the same as digits.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import gan_mc_anomaly as gma  # noqa: E402

BATCH = gma.BATCH_SIZE
MC_BATCHES = (1_000, gma.MC_BATCH_SIZE, 100_000)  # Monte Carlo batch sizes compared


def dense_flops(widths_in_out, batch):
    """Return the forward FLOPs of each dense layer (a multiply and an add per weight)."""
    return [2 * batch * n_in * n_out for n_in, n_out in widths_in_out]


def layer_shapes(n_in, widths, n_out):
    sizes = [n_in, *widths, n_out]
    return list(zip(sizes[:-1], sizes[1:]))


def network_shapes(settings):
    """Return the (inputs, outputs) of each dense layer of the generator and of the
    discriminator that the settings build, as two lists."""
    return (layer_shapes(settings["LATENT_DIM"], settings["GENERATOR_WIDTHS"], gma.IMAGE_PIXELS),
            layer_shapes(gma.IMAGE_PIXELS, settings["DISCRIMINATOR_WIDTHS"], 1))


def training_step_flops(settings, batch):
    """Return the matrix-multiply FLOPs of one step of the script's train_step.

    A dense layer costs f forward, f for its weight gradient and f for its input gradient;
    the first layer of a network needs no input gradient. Discriminator update: generator
    forward, then forward and weight and input gradients through D for the real and the
    generated batch. Generator update: G and D forward, input gradients through D (its
    weights are not updated), weight and input gradients through G.
    """
    g, d = (dense_flops(shapes, batch) for shapes in network_shapes(settings))
    f_g, f_d = sum(g), sum(d)
    d_update = f_g + 2 * (f_d + f_d + (f_d - d[0]))
    g_update = (f_g + f_d) + f_d + (f_g + (f_g - g[0]))
    return d_update + g_update


def scoring_flops_per_image(settings):
    """Return the forward FLOPs of generating and scoring one Monte Carlo image."""
    return sum(sum(dense_flops(shapes, 1)) for shapes in network_shapes(settings))


def timed_rate(run_once, units_per_run, seconds):
    """Return units per second of run_once, after one warm-up call, over about `seconds`."""
    run_once()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run_once()
        runs += 1
    return runs * units_per_run / (time.perf_counter() - started)


def matmul_rate(seconds):
    """Return this machine's float32 matrix-multiply rate in FLOP/s (2048 x 2048 products)."""
    import tensorflow as tf

    n = 2048
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))

    @tf.function
    def product():
        return tf.reduce_sum(tf.matmul(a, b))

    return timed_rate(lambda: product().numpy(), 2 * n ** 3, seconds)


def step_products_rate(settings, batch, seconds):
    """Return the FLOP/s of the training step's matrix products alone, at its layer shapes.

    For every dense layer of both networks, the forward product, the weight-gradient
    product and the input-gradient product at this batch size, compiled with XLA and
    chained so that none can be skipped or merged. Nothing else (activations, losses, the
    optimiser) runs, so a training step cannot beat this share of the matmul rate.
    """
    import tensorflow as tf

    generator_shapes, discriminator_shapes = network_shapes(settings)
    shapes = generator_shapes + discriminator_shapes
    rng = np.random.default_rng(0)
    tensors = [tuple(tf.constant(rng.normal(size=shape).astype(np.float32))
                     for shape in ((batch, n_in), (n_in, n_out), (batch, n_out)))
               for n_in, n_out in shapes]
    repeats = 20

    @tf.function(jit_compile=True)
    def products():
        def one_pass(i, total):
            nudge = 1.0 + 1e-12 * total  # depends on the last pass, so passes stay serial
            for inputs, weights, output_gradient in tensors:
                total += tf.reduce_sum(tf.matmul(inputs * nudge, weights))
                total += tf.reduce_sum(tf.matmul(inputs * nudge, output_gradient,
                                                 transpose_a=True))
                total += tf.reduce_sum(tf.matmul(output_gradient * nudge, weights,
                                                 transpose_b=True))
            return i + 1, total

        return tf.while_loop(lambda i, _: i < repeats, one_pass, (0, 0.0))[1]

    flops = repeats * 3 * sum(dense_flops(shapes, batch))
    return timed_rate(lambda: products().numpy(), flops, seconds)


def compiled_step_rate(settings, images, seconds, steps_per_call, xla, autotune=False):
    """Return (steps per second, epochs timed) of the script's GAN.fit() on its tf.data
    pipeline.

    It trains in epochs over `images`, as the script does, so the rate includes what each
    epoch costs beyond its steps (a new pass of the pipeline, a last short call). One epoch
    compiles the step; two more give a first estimate; the timed fit() then runs enough
    epochs for about `seconds`. autotune=True turns on tf.data's autotuning, which the
    script turns off.
    """
    gan = gma.build_gan(settings, steps_per_execution=steps_per_call, jit_compile=xla)
    dataset = gma.training_dataset(images, BATCH, 0, autotune=autotune)
    steps_per_epoch = len(images) // BATCH
    gan.fit(dataset, epochs=1, verbose=0, shuffle=False)
    started = time.perf_counter()
    gan.fit(dataset, epochs=2, verbose=0, shuffle=False)
    epochs = max(2, round(2 / (time.perf_counter() - started) * seconds))
    started = time.perf_counter()
    gan.fit(dataset, epochs=epochs, verbose=0, shuffle=False)
    return epochs * steps_per_epoch / (time.perf_counter() - started), epochs


def usual_loop_rate(settings, images, seconds):
    """Return steps per second of the common hand-written loop: predict + two
    train_on_batch calls a step, with NumPy arrays passed back and forth."""
    import keras

    latent = settings["LATENT_DIM"]
    generator = gma.build_generator(latent, settings["GENERATOR_WIDTHS"])
    discriminator = gma.build_discriminator(settings["DISCRIMINATOR_WIDTHS"])
    optimizer = {"learning_rate": settings["LEARNING_RATE"],
                 "beta_1": settings["ADAM_BETA_1"]}
    discriminator.compile(keras.optimizers.Adam(**optimizer),
                          keras.losses.BinaryCrossentropy(from_logits=True))
    discriminator.trainable = False
    noise_input = keras.Input((latent,))
    stacked = keras.Model(noise_input, discriminator(generator(noise_input)))
    stacked.compile(keras.optimizers.Adam(**optimizer),
                    keras.losses.BinaryCrossentropy(from_logits=True))
    discriminator.trainable = True
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.ones((BATCH, 1)), np.zeros((BATCH, 1))]).astype(np.float32)
    ones = np.ones((BATCH, 1), np.float32)

    def step():
        real = images[rng.integers(0, len(images), BATCH)]
        fake = generator.predict(rng.normal(size=(BATCH, latent)).astype(np.float32),
                                 verbose=0)
        discriminator.train_on_batch(np.concatenate([real, fake]), labels)
        stacked.train_on_batch(rng.normal(size=(BATCH, latent)).astype(np.float32), ones)

    def run_once():
        for _ in range(10):
            step()

    return timed_rate(run_once, 10, seconds)


def scoring_products_rate(settings, batch, seconds):
    """Return the FLOP/s of Monte Carlo scoring's matrix products alone, at its layer shapes.

    One forward product per dense layer of the generator and then the discriminator, for a
    batch of `batch` rows, chained as the networks chain them and compiled as the script's
    scoring function is (tf.function, no XLA). Nothing else runs (no noise, biases,
    activations or copies), so Monte Carlo scoring cannot beat this share of the matmul rate.
    """
    import tensorflow as tf

    generator_shapes, discriminator_shapes = network_shapes(settings)
    shapes = generator_shapes + discriminator_shapes
    rng = np.random.default_rng(0)
    weights = [tf.constant(rng.normal(scale=n_in ** -0.5, size=(n_in, n_out)).astype(np.float32))
               for n_in, n_out in shapes]
    inputs = tf.constant(rng.normal(size=(batch, settings["LATENT_DIM"])).astype(np.float32))

    @tf.function
    def products():
        rows = inputs
        for weight in weights:
            rows = tf.matmul(rows, weight)
        return rows[0, 0]

    return timed_rate(lambda: products().numpy(),
                      batch * scoring_flops_per_image(settings), seconds)


def scoring_rate(settings, batch, seconds):
    """Return Monte Carlo images generated and scored per second, in batches of `batch`.

    Each timed call draws and scores MC_SAMPLES images, as the script's one call does, so
    the cost of tracing its compiled functions is spread as it is in a run.
    """
    generator = gma.build_generator(settings["LATENT_DIM"], settings["GENERATOR_WIDTHS"])
    discriminator = gma.build_discriminator(settings["DISCRIMINATOR_WIDTHS"])
    count = settings["MC_SAMPLES"]

    def run_once():
        gma.monte_carlo_sample(generator, discriminator, count, batch, settings["LATENT_DIM"],
                               0)

    return timed_rate(run_once, count, seconds)


def noise_draw_seconds(settings, seconds):
    """Return the seconds that drawing one batch of MC_BATCH_SIZE latent vectors takes, as
    Monte Carlo scoring draws them (gan_mc_anomaly.noise_batches)."""
    batches = gma.noise_batches(0, settings["MC_BATCH_SIZE"], settings["LATENT_DIM"])
    # One number out waits for the draw without copying the whole batch, which scoring
    # never does.
    return 1.0 / timed_rate(lambda: next(batches)[0, 0].numpy(), 1, seconds)


def neighbour_flops_per_image(settings):
    """Return the matrix-multiply FLOPs of one image's nearest_generated score: a dot
    product with each of the NEIGHBOUR_SAMPLES kept generated images."""
    return 2 * gma.IMAGE_PIXELS * settings["NEIGHBOUR_SAMPLES"]


def neighbour_scoring_rate(settings, seconds):
    """Return images per second scored by nearest_generated (blur included) against
    NEIGHBOUR_SAMPLES generated images, for a test-set-sized batch of 10,000 images."""
    rng = np.random.default_rng(0)
    reference = gma.blur(rng.uniform(size=(settings["NEIGHBOUR_SAMPLES"], gma.IMAGE_PIXELS)),
                         settings["NEIGHBOUR_BLUR"])
    images = rng.uniform(size=(10_000, *gma.IMAGE_SHAPE)).astype(np.float32)

    def run_once():
        gma.image_scores("nearest_generated", None, reference, images, settings)

    return timed_rate(run_once, len(images), seconds)


PEAK_MEMORY = """
import resource, sys
sys.path.insert(0, {repo!r})
import gan_mc_anomaly as gma
s = gma.default_settings()
generator = gma.build_generator(s["LATENT_DIM"], s["GENERATOR_WIDTHS"])
discriminator = gma.build_discriminator(s["DISCRIMINATOR_WIDTHS"])
gma.monte_carlo_sample(generator, discriminator, int(sys.argv[1]), s["MC_BATCH_SIZE"],
                       s["LATENT_DIM"], 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_memory_mib(samples):
    """Return the peak resident memory (MiB) of a fresh process that scores `samples`."""
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY.format(repo=REPO),
                             str(samples)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def config_name(steps_per_call, xla, precision, autotune=False):
    name = f"steps_per_call={steps_per_call}, xla={xla}"
    if precision != "float32":
        name += f", {precision}"
    if autotune:
        name += ", tf.data autotune"
    return name


def spread(values):
    """Return the median, lowest and highest of a rate measured once per round."""
    return {"median": float(np.median(values)), "low": float(np.min(values)),
            "high": float(np.max(values))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measuring time of each rate, after a warm-up call")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of every rate (median reported)")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results"),
                        help="folder for speed.json")
    args = parser.parse_args(argv)

    import tensorflow as tf

    started = time.perf_counter()
    settings = gma.default_settings()
    gma.make_reproducible(settings["SEED"])
    device = gma.resolve_device(settings["DEVICE"])
    images = np.random.default_rng(0).uniform(-1, 1, (6000, gma.IMAGE_PIXELS)).astype(
        np.float32)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
               "processor": platform.processor(), "cores": os.cpu_count(), "device": device,
               "tensorflow": tf.__version__, "batch": BATCH, "rounds": args.rounds,
               "seconds_per_rate": args.seconds}
    # (steps per call, XLA, precision, tf.data autotuning): the script's choices and others.
    configurations = [(1, False, "float32", False), (20, False, "float32", False),
                      (1, True, "float32", False), (20, True, "float32", False),
                      (20, True, "float32", True)]
    if "gpu" in device.lower():  # 16-bit floats are only faster on GPUs
        configurations += [(20, True, "mixed_float16", False),
                           (20, True, "mixed_bfloat16", False)]
    step_flops = training_step_flops(settings, BATCH)
    results["training_step_gflop"] = step_flops / 1e9
    rounds = []
    with tf.device(device):
        for round_number in range(args.rounds):
            peak = matmul_rate(args.seconds)
            step_products = step_products_rate(settings, BATCH, args.seconds)
            found = {"matmul_gflops": peak / 1e9,
                     "step_products_gflops": step_products / 1e9,
                     "step_products_share": step_products / peak,
                     "usual_loop_steps_per_s": usual_loop_rate(settings, images,
                                                               args.seconds)}
            for steps_per_call, xla, precision, autotune in configurations:
                rate, epochs = compiled_step_rate(dict(settings, PRECISION=precision), images,
                                                  args.seconds, steps_per_call, xla, autotune)
                found[config_name(steps_per_call, xla, precision, autotune)] = {
                    "steps_per_s": rate, "share_of_matmul_rate": rate * step_flops / peak,
                    "times_usual_loop": rate / found["usual_loop_steps_per_s"],
                    "epochs_timed": epochs}
            mc_products = scoring_products_rate(settings, settings["MC_BATCH_SIZE"],
                                                args.seconds)
            found["mc_products_gflops"] = mc_products / 1e9
            found["mc_products_share"] = mc_products / peak
            for batch in MC_BATCHES:
                scored = scoring_rate(settings, batch, args.seconds)
                found[f"mc_batch_{batch}"] = {
                    "images_per_s": scored,
                    "share_of_matmul_rate": scored * scoring_flops_per_image(settings) / peak}
            batch_seconds = (settings["MC_BATCH_SIZE"]
                             / found[f"mc_batch_{settings['MC_BATCH_SIZE']}"]["images_per_s"])
            found["mc_noise_draw_s"] = noise_draw_seconds(settings, args.seconds)
            found["mc_noise_share_of_batch_time"] = found["mc_noise_draw_s"] / batch_seconds
            neighbours = neighbour_scoring_rate(settings, args.seconds)
            found["nearest_generated_images_per_s"] = neighbours
            found["nearest_generated_share_of_matmul_rate"] = (
                neighbours * neighbour_flops_per_image(settings) / peak)
            rounds.append(found)
            print(f"round {round_number + 1}/{args.rounds}: matmul {peak / 1e9:.0f} GFLOP/s, "
                  + ", ".join(f"{config_name(*c)} {found[config_name(*c)]['steps_per_s']:.0f}"
                              for c in configurations) + " steps/s, Monte Carlo "
                  + ", ".join(f"batch {b:,} {found[f'mc_batch_{b}']['images_per_s']:,.0f}"
                              for b in MC_BATCHES) + " images/s", flush=True)
        results["rounds"] = rounds
        for key in ("matmul_gflops", "step_products_share", "usual_loop_steps_per_s",
                    "mc_products_share", "mc_noise_share_of_batch_time",
                    "nearest_generated_images_per_s",
                    "nearest_generated_share_of_matmul_rate"):
            results[key] = spread([r[key] for r in rounds])
        results["compiled"] = {
            config_name(*c): {key: spread([r[config_name(*c)][key] for r in rounds])
                              for key in ("steps_per_s", "share_of_matmul_rate",
                                          "times_usual_loop")}
            for c in configurations}
        default = config_name(gma.STEPS_PER_CALL, gma.USE_XLA, settings["PRECISION"])
        results["script_default"] = default
        results["monte_carlo"] = {
            f"batch {batch}": {key: spread([r[f"mc_batch_{batch}"][key] for r in rounds])
                               for key in ("images_per_s", "share_of_matmul_rate")}
            for batch in MC_BATCHES}
        results["mc_batch_default"] = settings["MC_BATCH_SIZE"]
    results["peak_memory_mib"] = {n: peak_memory_mib(n) for n in (10_000, 1_000_000)}
    results["memory_ratio"] = (results["peak_memory_mib"][1_000_000]
                               / results["peak_memory_mib"][10_000])

    def with_range(rate, form):
        return (f"{format(rate['median'], form)} "
                f"({format(rate['low'], form)}-{format(rate['high'], form)})")

    lines = [
        f"Speed on {results['machine']}, {results['cores']} cores, device {device}, "
        f"TensorFlow {tf.__version__}, {results['date']} (batch {BATCH}, default networks)",
        f"Rates: median (lowest-highest) of {args.rounds} interleaved rounds",
        f"  float32 matmul rate (2048^3):     {with_range(results['matmul_gflops'], '.1f')} "
        "GFLOP/s",
        f"  the step's matrix products alone: "
        f"{with_range(results['step_products_share'], '.0%')} of the matmul rate",
        f"  training step:                     {results['training_step_gflop']:.3f} GFLOP",
        f"  usual loop (predict + 2x train_on_batch): "
        f"{with_range(results['usual_loop_steps_per_s'], '.1f')} steps/s",
    ]
    for name, row in results["compiled"].items():
        marker = "  <- script default" if name == default else ""
        lines.append(f"  compiled step, {name:<44} "
                     f"{with_range(row['steps_per_s'], '.1f')} steps/s, "
                     f"{row['times_usual_loop']['median']:.1f}x the usual loop, "
                     f"{with_range(row['share_of_matmul_rate'], '.0%')} of the matmul "
                     f"rate{marker}")
    lines.append(f"  Monte Carlo scoring's matrix products alone: "
                 f"{with_range(results['mc_products_share'], '.0%')} of the matmul rate")
    for batch in MC_BATCHES:
        row = results["monte_carlo"][f"batch {batch}"]
        marker = "  <- script default" if batch == settings["MC_BATCH_SIZE"] else ""
        lines.append(f"  Monte Carlo scoring, batch {batch:<8,} "
                     f"{with_range(row['images_per_s'], ',.0f')} images/s, "
                     f"{with_range(row['share_of_matmul_rate'], '.0%')} of the matmul "
                     f"rate{marker}")
    results["elapsed_minutes"] = (time.perf_counter() - started) / 60
    lines += [
        f"  Monte Carlo noise draw alone:      "
        f"{with_range(results['mc_noise_share_of_batch_time'], '.0%')} of a batch's time",
        f"  nearest_generated scoring:         "
        f"{with_range(results['nearest_generated_images_per_s'], ',.0f')} images/s against "
        f"{settings['NEIGHBOUR_SAMPLES']:,} neighbours, "
        f"{with_range(results['nearest_generated_share_of_matmul_rate'], '.0%')} of the "
        "matmul rate",
        f"  peak memory scoring 10,000:        {results['peak_memory_mib'][10_000]:.0f} MiB",
        f"  peak memory scoring 1,000,000:     {results['peak_memory_mib'][1_000_000]:.0f} "
        f"MiB ({results['memory_ratio']:.2f}x)",
        f"Measured in {results['elapsed_minutes']:.1f} minutes.",
    ]
    print("\n".join(lines))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "speed.json"), "w", encoding="utf-8") as file:
        json.dump(gma.to_json_value(results), file, indent=2)
    with open(os.path.join(args.output, "speed.txt"), "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
