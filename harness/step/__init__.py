"""The training and validation steps, apart from the loop that calls them (`harness.loop`).

`factory.make_train_step` / `factory.make_eval_step` choose and build them; `standard.TrainStep` is the compiled
whole-graph step, `layerwise.LayerwiseTrainStep` the layer-by-layer checkpointed one, `accumulate` holds what
both share (gradient sums over micro-batches, streams and ranks; the optimizer update), `cpu_streams` the split
of a micro-batch's rows over CPU streams, `loss` the objective. This package imports nothing on import, so
`harness.distributed` can use `cpu_streams` while the steps use `harness.distributed`.
"""
