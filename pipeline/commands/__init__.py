"""The job's commands (``python -m pipeline.commands.cli``) and the dashboard: may import
anything in ``pipeline``; each heavy import happens only when its command runs."""
