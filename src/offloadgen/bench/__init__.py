"""`offloadgen bench`: the reference's run_generation (DeepSpeed ZeRO-Inference), metrics and logs."""
