"""Studies beyond the default pipeline, each a command run from the project root: the nullspace
arms over several seeds (`study`), pre-training length and augmentation (`baseline_study`), the
LayerShuffle recipe on harder data (`recipe_study`)."""
