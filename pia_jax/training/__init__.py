"""PIA training. config: TrainConfig (YAML + key=value overrides); state: models, trainable/frozen split, optimizer;
step: the objective and the compiled, sharded step; checkpoint: orbax; metrics: FLOPs, MFU, stdout/TensorBoard;
loop: the resumable run and the export; synthetic: clips for smoke runs and tests; validation: sample videos."""
