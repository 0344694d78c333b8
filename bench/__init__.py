"""Reproducible benchmarks: distillation quality, serving cost, the server under load, GPU.

`python -m bench quality|cost|server|report|all`; each part writes `bench/results/<part>.json` and
`python -m bench report` turns whatever results exist into `docs/BENCHMARKS.md` and its plots.
"""
