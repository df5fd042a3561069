"""Offline lm-eval tasks: the YAML files here, whose documents `task_data` builds from the bundled corpora.

`python -m eval` puts this folder on lm-eval's include path; elsewhere pass it yourself, e.g.
`lm_eval.tasks.TaskManager(include_path=<this folder>)`.
"""
