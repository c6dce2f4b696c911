"""The executor: deploys a planner Plan for real and measures it.

It owns every side effect (processes, GPUs, files of a run). It meets the planner only in plain data: a
``RunSpec`` (the Plan plus what to run) goes down to the worker ranks, a ``hpi.records.RunRecord`` (JSON) comes back.
torch, deepspeed and transformers are imported inside this package only.
"""
