"""Analyses of trained or named models, outside training: `compare` (where models disagree) and
`benchmark` (parameters, FLOPs, throughput)."""
