"""The processes of a run: the environment and process group (`env`), the elastic launcher (`launch`), stop
signals (`signals`) and the wrapping of a model for several ranks (`parallel`: single / DDP / FSDP2)."""
