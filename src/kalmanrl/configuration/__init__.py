"""The experiment config (schema, defaults, validation of every registry name, per-stage slices) and the job
settings resolved once from it (`settings`). Imports the layers below; the jobs read what it resolves."""
