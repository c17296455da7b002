"""Anytime evaluation of a trained FractalNet: the full network and every column alone.

    python experiments/anytime.py --workdir runs/digits [--step S] [--out DIR]

For the full network and each column alone it reports depth (conv layers), parameters (of the
column as a standalone network), FLOPs per image, and eval accuracy twice: with the running
BatchNorm statistics of training, which every network shares, and with the network's own
precise statistics, those the run's reported accuracies were computed with
(`fractal_jax.analysis.anytime`). It writes to OUT (default: the run's workdir):

  anytime.md, anytime.csv  the accuracy table; running again with the same arguments writes
                           byte-identical files;
  anytime_speed.md         measured eval images/s of each network, which varies with the
                           machine and its load (hence a file of its own);
  anytime.png              accuracy against depth, for both kinds of statistics.
"""
import os
import sys

# Run as a script: make the repository importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

import jax  # noqa: E402

from fractal_jax.analysis import anytime, runs  # noqa: E402
from fractal_jax.analysis.timing import eval_images_per_second  # noqa: E402
from fractal_jax.runtime import configure_jax  # noqa: E402
from fractal_jax.training.checkpoint import CheckpointError  # noqa: E402


def speed_table(run: runs.Run) -> str:
    """Returns a markdown table of each network's measured eval images/s on this machine."""
    lines = [f"eval images/s on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), "
             f"batch {run.config.eval_batch_size}", "",
             "| network | eval images/s |", "|---|---:|"]
    for column in anytime.columns(anytime.check_fractal(run)):
        lines.append(f"| {anytime.network_name(column)} | "
                     f"{eval_images_per_second(run, column):,.0f} |")
    return "\n".join(lines)


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained run's workdir")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the newest)")
    parser.add_argument("--out", default=None, help="output directory (default: the workdir)")
    args = parser.parse_args(argv)
    configure_jax()
    out = args.out or args.workdir
    try:
        run = runs.load_run(args.workdir, args.step)
        rows = anytime.anytime_rows(run)
        speed = speed_table(run)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    table = (f"{run.workdir} at step {run.step}: accuracy on {run.config.dataset}/"
             f"{run.config.data.eval_split}; precise BatchNorm statistics on the first "
             f"{run.config.precise_bn.num_examples} training examples\n\n"
             + anytime.markdown_table(rows))
    files = [write(os.path.join(out, "anytime.md"), table + "\n"),
             write(os.path.join(out, "anytime.csv"), anytime.csv_text(rows)),
             write(os.path.join(out, "anytime_speed.md"), speed + "\n"),
             anytime.plot_accuracy_vs_depth(rows, os.path.join(out, "anytime.png"))]
    print(f"{table}\n\n{speed}\n\nwritten: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
