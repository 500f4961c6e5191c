"""Stage 2: training a LoRA on the cache (`stage.py`: the loop; `setup.py`: the run built in dependency
order; `step.py`: what each sample should predict and one optimizer step; `prefetch.py`: the next step's
batches read while this one computes). It never imports the cache stage."""
