"""`ferry roofline MODEL`: LLM-Viewer's per-operator roofline analysis on this machine's measured bandwidth and
peaks (hardware.py), ferry's operators of one step (analysis.py), the same step run and timed (measure.py), and
the table, JSON and chart (report.py); run.py ties them together."""
