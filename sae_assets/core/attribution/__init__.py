"""Training-data attribution from per-datum parameter shifts, as pure computation, after
"Gradient capture / training-data attribution from outlier parameter shifts" (SERI MATS 3.1).

While the language model trains, `capture.ShiftCapture` hooks the tracked weights
(`tensors`), turns one forward and one backward per step into every datum's parameter shift
(`transforms` maps a datum's gradient share through the clip coefficient and the optimizer),
keeps the top-k |shift| per datum (`topk`), checks that the shifts sum to the applied update
and hands out step ranges as Arrow tables (`records`). `tables` publishes them and groups
parameters into units (MLP neurons, attention heads); `heuristic` finds each unit's notable
tokens; `ablation` zero-ablates units and counts prediction flips; `analysis` assembles the
attribution tables. Nothing here knows Dagster or storage. Tests: tests/test_attribution_core.py.
"""
