"""The model and what is done with it: loading and saving, the rollout engines, the rollout batch, per-token
log-probs and the optimiser. Imports the layers below (`core` to `rl`), never a config or a job."""
