"""Benchmarks: each prints figures and asserts nothing, run as `python -m jobs.bench.<name>`.

- `ablations`: the paper's ablation table on synthetic products (in process, no Ray).
- `deployment_sizes`: does the default recipe learn at every deployment size (products x shots)?
- `feature_probe`: can a backbone's patch features tell defects apart at all (a linear probe)?
- `throughput`: one deployment end to end through the jobs, timed.
- `night_bench`: a night at archive scale through the real `jobs.score`, and its stages in one process.

`common` holds what several of them share (the generated data, one ablation row, the table cells).
"""
