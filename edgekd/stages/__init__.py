"""The pipeline stages, in order: teacher, distill, prune, export, quantize, benchmark, report.

Each is a package that owns its concern: `config` (its section of pipeline.yaml), its artifact names, and
`plan(cfg) -> StagePlan | None` / `run(settings, ctx) -> StageResult` (see `edgekd.runner.contract`);
the larger ones keep their mechanics beside (`prune.pruning`, `export.exporter`, `quantize.quantization`,
`benchmark.measure`).
"""
