"""Datasets: the `data:` section (`config`), the bundled and on-disk sources (`sources`) and the splits every
stage trains and evaluates on (`bundle.load_data`). This face imports nothing heavy (no torch)."""
