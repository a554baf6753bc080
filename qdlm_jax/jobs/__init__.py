"""Jobs: a config in, a run directory out (quantize, train, study, demo, model card), and
the ml-collections config handling they share. The `qdlm` commands are thin front ends."""
