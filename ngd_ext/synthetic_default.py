"""The two flags that shape a stage's embedded synthetic default, --synthetic-size and --data-seed, shared by the
stages that read data. They mean nothing beside a dataset flag, which replaces the default, and are refused there."""

SIZE, DATA_SEED = "demo", 0


def add_synthetic_flags(parser, sizes, what):
    """Add --synthetic-size (one of `sizes`) and --data-seed; `what` names the data they shape in the help."""
    parser.add_argument("--synthetic-size", choices=sorted(sizes),
                        help=f"size of {what}, used with no dataset flag (default {SIZE})")
    parser.add_argument("--data-seed", type=int,
                        help=f"seed of {what}, used with no dataset flag (default {DATA_SEED}); --seed leaves them as "
                             "they are")


def settle_synthetic_flags(parser, args, dataset_flags):
    """Fill in --synthetic-size and --data-seed after parsing, or stop with a usage error naming them where a flag of
    `dataset_flags` (e.g. ["--ferplus"]) was given beside them."""
    given = [flag for flag, value in (("--synthetic-size", args.synthetic_size), ("--data-seed", args.data_seed))
             if value is not None]
    datasets = [flag for flag in dataset_flags if getattr(args, flag[2:].replace("-", "_"))]
    if given and datasets:
        verb, pronoun = ("shapes", "it") if len(given) == 1 else ("shape", "them")
        parser.error(f"{' and '.join(given)} {verb} the embedded synthetic default, which {' and '.join(datasets)} "
                     f"{'replaces' if len(datasets) == 1 else 'replace'}: leave {pronoun} out")
    args.synthetic_size = SIZE if args.synthetic_size is None else args.synthetic_size
    args.data_seed = DATA_SEED if args.data_seed is None else args.data_seed
