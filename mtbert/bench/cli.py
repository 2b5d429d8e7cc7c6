"""The speed bench's command line (`mtbert.bench.speed`), apart from it so that
`python -m mtbert.bench --help` and a bad flag answer before torch loads."""

import argparse


def arguments() -> argparse.ArgumentParser:
    """The bench's command line: what it times, how long, and where it writes."""
    parser = argparse.ArgumentParser(
        prog="python -m mtbert.bench",
        description="Side-by-side speed benchmark: the naive loop, the bare step, mtbert's step and its variants, "
                    "the dev evaluation")
    parser.add_argument("--model", choices=["minilm", "tiny", "bert_base"], default="minilm")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="of the bare and mtbert steps (the naive loop is fp32)")
    parser.add_argument("--batch-size", type=int, default=32, help="per task")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder (not the naive loop's); eval then includes its compilation")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                        help="time the full dev evaluation")
    parser.add_argument("--train-steps", type=int, default=0, metavar="N",
                        help="then a short real run: mtbert and the naive loop N steps each, both scored")
    parser.add_argument("--compare-precision", action="store_true",
                        help="also run mtbert adam in the other precision")
    parser.add_argument("--compare-bucketing", action="store_true",
                        help="also run mtbert adam without length bucketing")
    parser.add_argument("--variant", action="append", default=[], metavar="'KEY=VALUE ...'",
                        help="also time mtbert adam with these Hydra overrides (space-separated: one "
                             "variant), and its speed ratio (repeatable)")
    parser.add_argument("--naive-update", choices=("combined", "per_task"), default="combined",
                        help="the naive loop's AdamW steps: one on the summed loss (mtbert's update) "
                             "or one after each task")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for every variant (repeatable)")
    parser.add_argument("--out", action="append", default=[], metavar="PATH",
                        help="write the result: .json or .md (repeatable)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure each variant's peak memory alone, in a process of its own, first")
    parser.add_argument("--memory-of", metavar="VARIANT", help=argparse.SUPPRESS)  # the child of --memory
    return parser
