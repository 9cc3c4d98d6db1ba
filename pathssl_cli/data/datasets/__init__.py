"""One file per classification benchmark; `pathssl_cli.data.benchmarks.DATASETS` registers them."""
