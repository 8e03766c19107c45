"""The ``archer`` command.

    archer fit --config configs/quickstart.yaml        # LightningCLI: fit | validate
    archer fit --config X.yaml --print_config           # the fully resolved config
    archer fit --config X.yaml --ckpt_path last         # resume from the newest checkpoint
    archer tiny-model OUT_DIR                           # a tiny random Qwen2 + char tokenizer (offline)
    archer report RUN_DIR                               # plots + token view from a run's logs
    archer export CKPT OUT_DIR                          # checkpoint -> Hugging Face folder
"""

from __future__ import annotations

import argparse
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from archer.data import PromptDataModule
from archer.module import ArcherModule

TOOLS = ("tiny-model", "report", "export")


class ArcherCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule tokenizes prompts with the actor's own tokenizer.
        parser.link_arguments("model.model_path", "data.tokenizer_path")


def _tool(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="archer")
    sub = parser.add_subparsers(dest="tool", required=True)
    tiny = sub.add_parser("tiny-model", help="write a tiny random causal LM + tokenizer as a HF folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--num-layers", type=int, default=2)
    tiny.add_argument("--num-heads", type=int, default=4)
    tiny.add_argument("--tie-word-embeddings", action="store_true")
    report = sub.add_parser("report", help="plots and the token view from a run directory")
    report.add_argument("run_dir")
    report.add_argument("--out-dir", default=None)
    export = sub.add_parser("export", help="write a checkpoint's actor as a Hugging Face folder")
    export.add_argument("ckpt")
    export.add_argument("out_dir")
    args = parser.parse_args(argv)

    if args.tool == "tiny-model":
        from archer.tiny import write_tiny_model

        out = write_tiny_model(
            args.out_dir,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            tie_word_embeddings=args.tie_word_embeddings,
        )
        print(f"wrote tiny model + tokenizer to {out}")
    elif args.tool == "report":
        from archer.report import write_report

        for path in write_report(args.run_dir, args.out_dir):
            print(f"wrote {path}")
    elif args.tool == "export":
        from archer.export import export_checkpoint

        print(f"wrote {export_checkpoint(args.ckpt, args.out_dir)}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` is for calling from Python (tests), the console script reads ``sys.argv``."""
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in TOOLS:
        _tool(words)
        return
    # Both are by design here: the frozen reference stays in eval mode, and a checkpoint holds the
    # weights after the step's update (resume continues from them, with the matching data state).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # Lightning's own use of a deprecated torch API; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    ArcherCLI(ArcherModule, PromptDataModule, save_config_kwargs={"overwrite": True}, args=argv)


if __name__ == "__main__":
    main()
