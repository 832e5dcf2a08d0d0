"""The stage runner: run loop (`loop`), what a stage sees (`context`), the typed stage and manifest
contracts (`contract`), the run-directory lock (`lock`) and the torchrun launch (`launch`). Import the
submodules: this face imports nothing, so a stage importing the contracts pulls in no run loop."""
