from mtbert.bench.cli import arguments

arguments().parse_args()  # --help and a bad flag answer here, before torch loads

from mtbert.bench.speed import main  # noqa: E402

main()
