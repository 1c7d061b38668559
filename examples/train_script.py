"""Your own training script: the same code trains on a Mac (MLX) or a CUDA machine (torch), and
a checkpoint from one resumes on the other.

    python examples/train_script.py --backend torch --steps 200 --out runs/mine
    python examples/train_script.py --backend mlx --steps 400 --out runs/mine --resume latest
"""
import argparse

from retention.config import TrainConfig
from retention.train import train
from retention.data.tokenizer import default_tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["mlx", "torch"], default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/train_script")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    args = parser.parse_args()

    config = TrainConfig(
        model="tiny",                      # or create_model_config("small"), or a ModelConfig
        model_overrides={"n_layers": 4},
        data=["builtin"],                  # catalog names, local files or globs; mixed by data_mix
        seq_len=256, batch_size=8, grad_accum=2,
        lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.1, clip_norm=1.0,
        steps=args.steps, eval_every=100, save_every=100, keep_last=2,
        out_dir=args.out, resume=args.resume, seed=0,
    )
    result = train(config, backend=args.backend)
    print(f"{result.backend}: step {result.step}, last loss {result.summary['last_loss']:.3f}, "
          f"checkpoint {result.checkpoint}")
    print("tokenizer vocabulary:", default_tokenizer().vocab_size)


if __name__ == "__main__":
    main()
