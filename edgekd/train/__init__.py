"""Training shared by every stage that trains: the one loop (`loop.fit`), objectives (CE, KD, FitNets hint),
their settings (`config`) and the DDP helpers. Import the submodules: this face imports nothing heavy."""
