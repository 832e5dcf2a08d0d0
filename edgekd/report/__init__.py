"""The deployment report: report.json / report.md / report.html, plots, the deploy bundle, and the
report-to-report comparison behind `edgekd compare`.

Modules (imported on demand; this file imports nothing, so `edgekd check` stays light):

  build     manifest -> report.json document (artifact rows, budgets, choice, flags, environment)
  deploy    runs/<name>/deploy/: model.onnx (+ .ort), labels.json, preprocess.json, README.md, eval.npz, runner
  plots     matplotlib (Agg) PNGs: accuracy vs latency with the Pareto front, file size, latency distribution
  tables    report -> display tables shared by the two renderers
  markdown  report.md        html  report.html (self-contained, no network)
  render    write everything for a run (the report stage and `edgekd report RUN_DIR`)
  compare   `edgekd compare` verdicts (regression / inconclusive / pass)
  junit     JUnit XML for run / check / compare
"""
