"""JSON Schemas: the contract of edgekd's files for editors and other tools (package data, edgekd/schemas/).

  config     pipeline.yaml     generated from the pydantic models (`PipelineConfig`); editors complete and
                               check keys through the `# yaml-language-server: $schema=...` comment
  report     report.json       the run's results: what `edgekd check` / `edgekd compare` and dashboards read
  device     device.json       what deploy/run_on_device.py writes on a board
  arm-check  arm_check.json    what `edgekd arm-check` writes
  bench      bench --json      what `edgekd bench --json` (edgekd.runtime.bench_model) writes

`edgekd schema NAME` prints one; `python -m edgekd.schema config > edgekd/schemas/pipeline.schema.json`
regenerates the shipped config schema (a test keeps it in sync). The output schemas are maintained by hand
and checked against real outputs of a tiny run in the tests. Readers should ignore unknown keys: a new key
is not a new `schema_version`; an incompatible change is.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

FILES = {"config": "pipeline.schema.json", "report": "report.schema.json", "device": "device.schema.json",
         "arm-check": "arm_check.schema.json", "bench": "bench.schema.json"}
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """pipeline.yaml's JSON Schema, from PipelineConfig (keys as written in YAML, docstrings as descriptions)."""
    from edgekd.config import PipelineConfig

    generated = PipelineConfig.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": DRAFT, "$id": "urn:edgekd:schema:config", "title": "edgekd pipeline.yaml",
            "description": "edgekd pipeline configuration (docs/config.md). A section set to null (distill, "
                           "prune, quantize) switches that stage off; unknown keys are errors.",
            **{k: v for k, v in generated.items() if k != "title"}}


def render(name: str) -> str:
    """The schema NAME as the shipped file's text (config: generated now)."""
    if name == "config":
        return json.dumps(config_schema(), indent=2) + "\n"
    return shipped_text(name)


def shipped_text(name: str) -> str:
    return files("edgekd").joinpath("schemas", FILES[name]).read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """A shipped schema as a dict (for jsonschema.validate and the like)."""
    return json.loads(shipped_text(name))


if __name__ == "__main__":
    import sys

    print(render(sys.argv[1] if len(sys.argv) > 1 else "config"), end="")
