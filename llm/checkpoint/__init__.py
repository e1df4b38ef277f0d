"""Checkpoints: the file format (`files`: safetensors weights + JSON state, written atomically, found by step,
`latest:` / `best:` names, compatibility checks) and `Checkpointer` (save / restore / prune / `last` during a run,
gathering FSDP shards)."""
