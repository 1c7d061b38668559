"""Quick start: train the tiny model on the built-in corpus for ~100 steps, then sample.

    python examples/quick_start.py [--backend mlx|torch] [--steps 100]

The same as `retention quickstart`, written with the public API so you can change any of it.
"""
import argparse

from retention import load_model
from retention.commands.train import clear_previous_run, quickstart_config, sample_text
from retention.data.tokenizer import default_tokenizer
from retention.plot import plot_run
from retention.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["mlx", "torch"], default=None,
                        help="default: mlx on Apple Silicon, torch elsewhere")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/quick_start")
    args = parser.parse_args()

    clear_previous_run(args.out)          # begin afresh (only an earlier run is removed)
    # tiny preset, vocabulary of the default tokenizer (8192), 4 layers, 128-token windows (one chunk)
    config = quickstart_config(args.out, args.steps)
    result = train(config, backend=args.backend)

    model = load_model(result.checkpoint, backend=result.backend)
    print("\n" + sample_text(model, default_tokenizer(), "In the beginning", temperature=0.8))
    print(f"\ncheckpoint: {result.checkpoint}\nplot:       {plot_run(args.out)}")


if __name__ == "__main__":
    main()
